"""The quickstart's data: an instruction set drawn from the shapes generator, held-out colour-shape pairs, and
evaluation splits in the official layouts that `minigpt4 eval` reads."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from minigpt4.data import synthetic
from minigpt4.data.synthetic import (
    ALL_PAIRS,
    HELD_OUT_PAIRS,
    QUESTION_KINDS,
    SEEN_PAIRS,
    SHORT_ANSWER_SUFFIX,
    Scene,
    absent_object,
    ask,
    conversation,
)
from minigpt4.eval.tasks import SHORT_ANSWER, read_captions, read_pope, read_vqa
from minigpt4.eval_shapes import parse_description


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("shapes"), num_stage1=60, num_stage2=120, num_validation=6,
                              num_test=8, num_test_unseen=6, include_photos=False)


def test_held_out_pairs_cover_every_colour_and_shape_once():
    assert len(HELD_OUT_PAIRS) == 6 and len(SEEN_PAIRS) == 30
    assert set(SEEN_PAIRS) | set(HELD_OUT_PAIRS) == set(ALL_PAIRS)
    assert sorted(c for c, _ in HELD_OUT_PAIRS) == sorted(synthetic.COLOURS)
    assert sorted(s for _, s in HELD_OUT_PAIRS) == sorted(synthetic.SHAPES)
    # The eval prompts' suffix is the one the instruction set trains with.
    assert SHORT_ANSWER == "{question}" + SHORT_ANSWER_SUFFIX


def test_unseen_pairs_are_never_trained_on_and_only_in_their_row(data):
    import webdataset as wds

    captions = [json.loads(s["json"])["caption"] for s in wds.WebDataset(data.stage1_shards, shardshuffle=False,
                                                                            empty_check=False)]
    trained = {parse_description(c) for c in captions}
    records = json.loads(data.stage2.read_text())
    for record in records:
        for message in record["conversations"]:
            colour, shape = parse_description(message["value"])
            if message["from"] == "gpt" and colour and shape and not message["value"].startswith("No"):
                trained.add((colour, shape))
    assert trained and not trained & set(HELD_OUT_PAIRS) and trained <= set(SEEN_PAIRS)
    for split in (data.validation, data.test):
        assert {(r["colour"], r["shape"]) for r in json.loads(split.scenes.read_text())} <= set(SEEN_PAIRS)
    assert {(r["colour"], r["shape"]) for r in json.loads(data.test_unseen.scenes.read_text())} <= set(HELD_OUT_PAIRS)
    # Disjoint seeds: no evaluation image repeats another split's.
    seeds = [{r["seed"] for r in json.loads(s.scenes.read_text())} for s in (data.validation, data.test,
                                                                            data.test_unseen)]
    assert not seeds[0] & seeds[1] and not seeds[1] & seeds[2]


def test_conversations_cover_every_kind_balanced_yes_no_and_several_rounds(data):
    records = json.loads(data.stage2.read_text())
    rounds = Counter(len(r["conversations"]) // 2 for r in records)
    assert rounds[1] and rounds[2] + rounds[3]  # single questions and multi-turn conversations
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert all("<image>" not in m["value"] for r in records for m in r["conversations"][1:])
    # Every kind is asked, and the yes/no probes are about half yes (many draws: the probe alone).
    rng, scene = random.Random(0), Scene("red", "circle", 1, "top left", "white", 0)
    answers = Counter(ask(scene, "yes_no", rng, [("blue", "star")], short=True)[1] for _ in range(2000))
    assert set(answers) == {"yes", "no"} and abs(answers["yes"] - 1000) < 100
    kinds = Counter()
    for _ in range(300):
        for question, _ in conversation(scene, rng, [("blue", "star")]):
            kinds[next(k for k in QUESTION_KINDS if _kind_of(question) == k)] += 1
    assert set(kinds) == set(QUESTION_KINDS)
    # Answers are true of the scene: short ones as a VQA annotator writes them, sentences otherwise.
    assert ask(scene, "colour", rng, [], short=True)[1] == "red"
    assert ask(scene, "count", rng, [], short=True)[1] == "1"
    assert ask(scene, "position", rng, [], short=True)[1] == "top left"
    assert ask(scene, "shape", rng, [], short=False)[1] == "It is a circle."
    question, answer = ask(Scene("orange", "star", 2, "scattered", "white", 0), "count", rng, [], short=True)
    assert question.endswith(SHORT_ANSWER_SUFFIX) and answer == "2"


def test_the_probe_weight_sets_the_yes_no_share_of_the_mix():
    scene = Scene("red", "circle", 1, "top left", "white", 0)

    def probe_share(weight: float) -> float:
        rng = random.Random(1)
        asked = [_kind_of(q) for _ in range(600) for q, _ in conversation(scene, rng, [("blue", "star")], probe_weight=weight)]
        return asked.count("yes_no") / len(asked)

    # Six kinds; drawn without repeats, so a probe is about 1/6 of the rounds at weight 1 (a bit more: later
    # rounds pick from what is left).
    assert probe_share(0.0) == 0.0
    assert 0.03 < probe_share(0.25) < 0.08 < 0.13 < probe_share(1.0) < 0.22


def _kind_of(question: str) -> str:
    lowered = question.lower()
    for word, kind in (("colour", "colour"), ("shape is", "shape"), ("which shape", "shape"), ("how many", "count"),
                       ("where", "position"), ("is there", "yes_no")):
        if word in lowered:
            return kind
    return "describe"


def test_absent_objects_are_sampled_as_pope_does():
    rng, scene = random.Random(1), Scene("red", "circle", 1, "centre", "white", 0)
    popular = [("red", "circle"), ("blue", "star"), ("green", "cross")]
    for _ in range(50):
        adversarial = absent_object(scene, "adversarial", rng, popular)
        colour, shape = adversarial.split()
        assert (colour == "red") != (shape == "circle")  # the closest confusion: one of the two differs
        assert absent_object(scene, "popular", rng, popular) in ("blue star", "green cross")
        assert absent_object(scene, "random", rng, popular) != "red circle"
    with pytest.raises(ValueError, match="unknown POPE setting"):
        absent_object(scene, "frequent", rng, popular)


def test_eval_splits_are_read_back_by_the_eval_readers(data):
    for split in (data.test, data.test_unseen):
        scenes = {r["image_id"]: r for r in json.loads(split.scenes.read_text())}
        captions = read_captions(split.captions, split.images)
        assert len(captions) == split.num_images and all(s.image.is_file() for s in captions)
        assert all(len(s.references) == 3 and scenes[int(s.id)]["colour"] in s.references[0].lower()
                   for s in captions)
        vqa = read_vqa(split.vqa_questions, split.vqa_annotations, split.images)
        assert all(s.image.is_file() and len(s.references) == 10 for s in vqa)
        by_image = Counter(s.image.name for s in vqa)
        assert len(by_image) == split.num_images and set(by_image.values()) <= {3, 4}  # position: one shape only
        colour = next(s for s in vqa if "colour" in s.question)
        assert colour.references == [scenes[int(colour.image.stem)]["colour"]] * 10
        probes: dict[str, set[str]] = {}
        for setting, path in split.pope.items():
            pope = read_pope(path, split.images)
            labels = Counter(s.references[0] for s in pope)
            assert labels == {"yes": split.num_images // 2, "no": split.num_images // 2}, setting  # balanced
            assert len({s.image.name for s in pope}) == split.num_images
            assert all(s.image.is_file() and s.question.startswith("Is there ") for s in pope)
            for sample in pope:
                drawn = scenes[int(sample.image.stem)]
                present = f" {drawn['colour']} {drawn['shape']} " in sample.question
                assert present == (sample.references[0] == "yes")
                probes.setdefault(sample.image.name, set()).add(sample.references[0])
        assert all(labels == {"yes", "no"} for labels in probes.values())  # each image: both, over the settings
