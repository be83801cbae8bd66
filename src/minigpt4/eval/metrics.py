"""The standard metrics, each a plain function: COCO captioning, VQAv2 accuracy, GQA exact match, POPE.

Captioning is pycocoevalcap's (the COCO caption evaluation's own scorers and PTB tokenizer, which run
Java). The answer normalisation and the VQA, exact-match and POPE rules are short published rules with no
maintained library of their own, so they are written here from their descriptions:

- VQA normalisation (visualqa.org, "Evaluation"): lower case; periods dropped unless they are a decimal
  point; commas inside numbers dropped; every other punctuation mark except the apostrophe and the colon
  becomes a space; number words become digits; the articles a, an, the are dropped; a contraction written
  without its apostrophe gets it back ("dont" -> "don't").
- VQA accuracy: the mean over the leave-one-annotator-out subsets of min(1, matching answers / 3).
- POPE (Li et al. 2023): keep the first sentence, drop commas, and read "no" when a word is "no", "No"
  or "not", otherwise "yes".
"""

from __future__ import annotations

import re
from importlib.metadata import version

# `minigpt4 eval` records these with its results.
METRIC_VERSIONS = {"pycocoevalcap": version("pycocoevalcap"), "vqa_normalisation": "visualqa.org v2",
                   "pope": "Li et al. 2023 first-sentence yes/no"}

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions as written; each is also recognised without its apostrophe(s). Left out: those whose
# apostrophe-less spelling is a common word (it's, we'll, we're, he'll, she'll, we'd, i'd, i'll, let's, she'd).
_CONTRACTIONS = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm", "i've",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "might've", "mustn't", "must've",
    "needn't", "o'clock", "oughtn't", "she'd've", "she's", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'll", "somebody's", "someone'd", "someone'll", "someone's",
    "something'd", "something'll", "something's", "that'd", "that's", "there'd", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "wasn't", "we'd've", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "you'd", "you'd've", "you'll", "you're", "you've",
]
_RESTORE_APOSTROPHE = {form.replace("'", ""): form for form in _CONTRACTIONS}
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)|(?<!\d)\.")
_PUNCTUATION = re.compile(r"[^\w\s':.]|_")  # the periods left are decimal points


def normalize_answer(text: str) -> str:
    """An answer in the VQA evaluation's normal form (see the module docstring): "Two dogs." -> "2 dogs"."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _NUMBER_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_RESTORE_APOSTROPHE.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one prediction against its annotators' answers (10 in VQAv2 and OK-VQA).

    Each annotator is left out in turn; against the others the prediction scores min(1, matches / 3);
    the result is the mean. So 3 of 10 matching score 0.9, 4 or more 1.0. Both sides are normalised
    (`normalize_answer`) every time; the official script skips that when all ten answers agree, where a
    prediction "two" against ten "2" would score 0 rather than 1.
    """
    if len(answers) < 2:
        raise ValueError(f"vqa_accuracy needs at least 2 annotator answers, got {len(answers)} "
                         "(use exact_match for a single reference answer)")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction equals the (GQA-style, single) answer after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def pope_answer(text: str) -> str:
    """A free-form answer read as "yes" or "no" the way the POPE authors read them (see the module docstring)."""
    first_sentence = text.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 and yes-ratio, with "yes" as the positive class.

    `predictions` are free-form answers (read by `pope_answer`); `labels` are "yes"/"no". A precision,
    recall or F1 whose denominator is 0 (no "yes" predicted, or none labelled) is 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_scores needs at least one prediction")
    bad = sorted({label for label in labels if label.strip().lower() not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad[:3]}")
    predicted_yes = [pope_answer(text) == "yes" for text in predictions]
    labelled_yes = [label.strip().lower() == "yes" for label in labels]
    pairs = list(zip(predicted_yes, labelled_yes, strict=True))
    true_pos = sum(p and t for p, t in pairs)
    false_pos = sum(p and not t for p, t in pairs)
    false_neg = sum(t and not p for p, t in pairs)
    true_neg = len(pairs) - true_pos - false_pos - false_neg
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (true_pos + true_neg) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(predicted_yes) / len(pairs)}


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as the COCO caption evaluation computes them (corpus level).

    Both sides go through the PTB tokenizer (lower case, punctuation removed), then each scorer of
    pycocoevalcap runs on its own: its all-in-one `COCOEvalCap` also runs SPICE, which needs Stanford
    CoreNLP models downloaded on first use, so SPICE is left out. pycocoevalcap's `Cider` is the COCO
    server's CIDEr-D (clipped counts, length penalty). Keys are COCOEvalCap's names (Bleu_1 .. CIDEr).
    Needs Java on PATH.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(predictions) != set(references):
        missing = sorted(set(references) - set(predictions))[:3]
        extra = sorted(set(predictions) - set(references))[:3]
        raise ValueError(f"predictions and references must have the same ids (missing {missing}, extra {extra})")
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    if any(not refs for refs in references.values()):
        raise ValueError("every id needs at least one reference caption")
    # One tokenizer run (one JVM start) for both sides; keys (side, id) keep them apart.
    captions = {("ref", key): [{"caption": text} for text in refs] for key, refs in references.items()}
    captions.update({("pred", key): [{"caption": text}] for key, text in predictions.items()})
    tokens = PTBTokenizer().tokenize(captions)
    refs = {key: tokens[("ref", key)] for key in references}
    preds = {key: tokens.get(("pred", key), [""]) for key in references}
    bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, 1)}
    meteor = Meteor()
    try:
        scores["METEOR"] = float(meteor.compute_score(refs, preds)[0])
    finally:
        del meteor  # its __del__ ends the Java process now rather than at exit
    scores["ROUGE_L"] = float(Rouge().compute_score(refs, preds)[0])
    scores["CIDEr"] = float(Cider().compute_score(refs, preds)[0])
    return scores
