"""Golden cases for `minigpt4.eval.metrics`, each with its answer worked out by hand (or, for captioning, by
pycocoevalcap's own scorers)."""

from __future__ import annotations

import shutil

import pytest

from minigpt4.eval.metrics import (
    caption_scores,
    exact_match,
    normalize_answer,
    pope_answer,
    pope_scores,
    vqa_accuracy,
)


def test_three_of_ten_annotators_score_point_nine():
    # Leaving out one of the 3 matching annotators leaves 2 matches (2/3), 3 times; leaving out one of the
    # 7 others leaves 3 matches (1.0), 7 times: (3 * 2/3 + 7) / 10 = 0.9.
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_accuracy("red", answers) == pytest.approx(0.9)
    assert vqa_accuracy("blue", answers) == pytest.approx(1.0)
    assert vqa_accuracy("green", answers) == 0.0
    # 1 of 10: 9 subsets hold it once (1/3), the one that leaves it out has none: 9/3/10 = 0.3.
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least 2 annotator answers"):
        vqa_accuracy("red", ["red"])


def test_number_words_articles_punctuation_and_contractions_are_normalised():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert exact_match("two", "2") == 1.0
    assert exact_match("a dog", "dog") == 1.0
    assert exact_match("The dog!", "dog") == 1.0
    assert exact_match("a dog", "cat") == 0.0
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("Yes, it is.") == "yes it is"
    assert normalize_answer("3.5") == "3.5"  # a decimal point stays
    assert normalize_answer("100,000") == "100000"  # so does a number with a thousands comma, without it
    assert normalize_answer("10:30") == "10:30"  # colons stay
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("well") == "well"  # not "we'll": an ordinary word is left alone


def test_pope_answers_are_read_as_the_authors_do():
    assert pope_answer("Yes, there is a dog in the image.") == "yes"
    assert pope_answer("No, there is no cat.") == "no"
    assert pope_answer("There is not a cat in the picture.") == "no"
    assert pope_answer("Yes. There is no other animal.") == "yes"  # only the first sentence counts
    assert pope_answer("No") == "no"
    assert pope_answer("I think so") == "yes"  # anything without no/No/not is a yes


def test_pope_scores_on_a_confusion_matrix_worked_on_paper():
    # Labels: 6 yes, 4 no. Of the 6 yes: 4 answered yes (TP = 4), 2 no (FN = 2); of the 4 no: 1 yes (FP = 1),
    # 3 no (TN = 3). Accuracy 7/10, precision 4/5, recall 4/6, F1 = 2TP / (2TP + FP + FN) = 8/11, yes 5/10.
    labels = ["yes"] * 6 + ["no"] * 4
    predictions = ["Yes, there is.", "Yes", "yes, a dog is there.", "Yes. No doubt.",  # TP
                   "No, there is not.", "I do not see one.",  # FN
                   "There is a cat.",  # FP
                   "No.", "No, there is no cat.", "There is not."]  # TN
    scores = pope_scores(predictions, labels)
    assert scores == pytest.approx({"accuracy": 0.7, "precision": 0.8, "recall": 4 / 6, "f1": 8 / 11,
                                    "yes_ratio": 0.5})
    assert pope_scores(["no", "no"], ["yes", "no"])["precision"] == 0.0  # no yes predicted: 0, not a crash
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_scores(["yes"], ["maybe"])


# Produced once by calling pycocoevalcap 1.2's scorers directly (PTBTokenizer().tokenize on both sides, then
# Bleu(4), Meteor(), Rouge(), Cider() .compute_score(gts, res), Java 17), on exactly these captions:
# Bleu [0.9999999998947368, 0.866025403689005, 0.6133748537249711, 0.3897574951484273]
# METEOR 0.3112938373084846, Rouge 0.6320136014604847, CIDEr 1.9916255311767046
REFERENCES = {
    "1": ["A dog runs across the green grass.", "A brown dog is running on a lawn.", "The dog plays in the park."],
    "2": ["Two people ride bicycles down a street.", "A couple of cyclists on a city road.",
          "People riding bikes in the city."],
    "3": ["A red bus parked next to the curb.", "A large red bus on the side of the road.",
          "The bus is red and stopped."],
}
PREDICTIONS = {"1": "A dog running on the grass.", "2": "Two people riding bikes on a street.",
               "3": "A red bus on the road."}
PYCOCOEVALCAP_PRINTED = {"Bleu_1": 0.9999999998947368, "Bleu_2": 0.866025403689005, "Bleu_3": 0.6133748537249711,
                         "Bleu_4": 0.3897574951484273, "METEOR": 0.3112938373084846, "ROUGE_L": 0.6320136014604847,
                         "CIDEr": 1.9916255311767046}


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")
def test_caption_scores_equal_what_pycocoevalcap_prints():
    scores = caption_scores(PREDICTIONS, REFERENCES)
    assert scores == pytest.approx(PYCOCOEVALCAP_PRINTED, rel=1e-9)
    assert "SPICE" not in scores


def test_caption_scores_need_the_same_ids_on_both_sides():
    with pytest.raises(ValueError, match=r"missing \['3'\]"):
        caption_scores({"1": "a dog", "2": "a bus"}, REFERENCES)
