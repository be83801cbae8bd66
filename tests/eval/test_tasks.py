"""Each task's reader on a tiny file in its official layout, and the scoring of each task."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from minigpt4.eval.tasks import REAL_PHOTOS, Sample, TaskFileError, read_task, score
from minigpt4.processing.image import load_image
from tests.eval.conftest import write_json, write_lines


def test_coco_captions_are_grouped_per_image(coco_captions, coco_images):
    samples = read_task("caption", None, coco_captions, coco_images)
    assert samples == [
        Sample("1", coco_images / "COCO_val2014_000000000001.jpg", None,
               ["A cat looking at the camera.", "An orange cat with green eyes."]),
        Sample("2", coco_images / "COCO_val2014_000000000002.jpg", None, ["A cat lying on its side."]),
    ]


def test_karpathy_split_keeps_one_split(tmp_path):
    annotations = write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "imgid": 0, "split": "test",
         "cocoid": 1, "sentids": [0, 1], "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"], "sentid": 0},
                                                      {"raw": "A pet.", "tokens": ["a", "pet"], "sentid": 1}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "imgid": 1, "split": "val",
         "cocoid": 2, "sentids": [2], "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"], "sentid": 2}]},
    ]})
    assert read_task("caption", None, annotations, tmp_path) == [
        Sample("1", tmp_path / "val2014" / "COCO_val2014_000000000001.jpg", None, ["A cat.", "A pet."])]
    assert [s.id for s in read_task("caption", None, annotations, tmp_path, split="val")] == ["2"]
    with pytest.raises(TaskFileError, match=r"no images in split 'train' \(it has \['test', 'val'\]\)"):
        read_task("caption", None, annotations, tmp_path, split="train")
    # Flickr30k's file has no filepath and no cocoid: the image is in the folder, the id is imgid.
    flickr = write_json(tmp_path / "dataset_flickr30k.json", {"images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "Two men."}]}]})
    assert read_task("caption", None, flickr, tmp_path) == [Sample("0", tmp_path / "1000092795.jpg", None,
                                                                   ["Two men."])]


def test_lavis_karpathy_list(tmp_path):
    annotations = write_json(tmp_path / "coco_karpathy_test.json", [
        {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["A cat.", "A pet."]}])
    assert read_task("caption", None, annotations, tmp_path) == [
        Sample("COCO_val2014_000000000001", tmp_path / "val2014/COCO_val2014_000000000001.jpg", None,
               ["A cat.", "A pet."])]


def test_vqav2_questions_and_annotations(tmp_path, coco_images):
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "questions": [{"image_id": 1, "question": "What animal is this?", "question_id": 1000},
                      {"image_id": 3, "question": "How many cats?", "question_id": 3000}]})
    annotations = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {
        "info": {}, "data_subtype": "val2014", "annotations": [
            {"question_id": 1000, "image_id": 1, "question_type": "what", "answer_type": "other",
             "multiple_choice_answer": "cat",
             "answers": [{"answer": "cat", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]},
            {"question_id": 3000, "image_id": 3, "question_type": "how many", "answer_type": "number",
             "multiple_choice_answer": "1",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i}
                         for i, a in enumerate(["1"] * 3 + ["2"] * 7, 1)]}]})
    samples = read_task("vqav2", questions, annotations, coco_images)
    assert samples == [
        Sample("1000", coco_images / "COCO_val2014_000000000001.jpg", "What animal is this?", ["cat"] * 10),
        Sample("3000", coco_images / "000000000003.jpg", "How many cats?", ["1"] * 3 + ["2"] * 7),  # 2017 name
    ]
    assert score("vqav2", samples, {"1000": "Cat.", "3000": "one"}) == {"accuracy": pytest.approx((1 + 0.9) / 2)}
    with pytest.raises(TaskFileError, match="is not a VQA annotations file"):
        read_task("okvqa", questions, questions, coco_images)


def test_gqa_balanced_questions(tmp_path):
    questions = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201307251": {"imageId": "n15740", "question": "Is the cat on the left?", "answer": "yes",
                      "fullAnswer": "Yes, the cat is on the left.", "isBalanced": True, "types": {}},
        "201640614": {"imageId": "n4412", "question": "What is the animal?", "answer": "cat",
                      "fullAnswer": "The animal is a cat.", "isBalanced": True, "types": {}}})
    samples = read_task("gqa", questions, None, tmp_path)
    assert samples == [Sample("201307251", tmp_path / "n15740.jpg", "Is the cat on the left?", ["yes"]),
                       Sample("201640614", tmp_path / "n4412.jpg", "What is the animal?", ["cat"])]
    assert score("gqa", samples, {"201307251": "Yes", "201640614": "a dog"}) == {"accuracy": 0.5}


def test_pope_json_lines(tmp_path):
    questions = write_lines(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?",
         "label": "no"}])
    samples = read_task("pope", questions, None, tmp_path)
    assert [(s.id, s.image.name, s.question, s.references) for s in samples] == [
        ("1", "COCO_val2014_000000000001.jpg", "Is there a cat in the image?", ["yes"]),
        ("2", "COCO_val2014_000000000001.jpg", "Is there a dog in the image?", ["no"])]
    assert score("pope", samples, {"1": "Yes, there is.", "2": "Yes."})["precision"] == 0.5
    maybe = write_lines(tmp_path / "maybe.json", [{"question_id": 3, "image": "x.jpg", "text": "?", "label": "maybe"}])
    with pytest.raises(TaskFileError, match="question 3 has label 'maybe'"):
        read_task("pope", maybe, None, tmp_path)


def test_folder_questions(tmp_path):
    questions = write_lines(tmp_path / "qa.jsonl", [
        {"image": "a.png", "question": "What animal?", "answer": "cat"},
        {"image": "sub/b.png", "question": "How many?", "answers": ["2", "2", "two", "3"], "id": "count"}])
    samples = read_task("folder", questions, None, None)
    assert samples == [Sample("1", tmp_path / "a.png", "What animal?", ["cat"]),
                       Sample("count", tmp_path / "sub/b.png", "How many?", ["2", "2", "two", "3"])]
    # One answer: exact match; several: the VQA rule (3 of 4 match "2": every subset holds >= 2 -> 2/3 or 1).
    assert score("folder", samples, {"1": "A cat.", "count": "2"})["accuracy"] == pytest.approx((1 + 0.75) / 2)
    bad = write_lines(tmp_path / "bad.jsonl", [{"image": "a.png", "question": "What?"}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl line 1 is not \{image, question, answer or answers\}"):
        read_task("folder", bad, None, None)


def test_missing_and_wrong_files_are_one_line_errors(tmp_path, coco_captions):
    with pytest.raises(TaskFileError, match="eval vqav2 needs --annotations and --images"):
        read_task("vqav2", tmp_path / "q.json", None, None)
    with pytest.raises(TaskFileError, match="no such file"):
        read_task("gqa", tmp_path / "nope.json", None, tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TaskFileError, match="is not JSON"):
        read_task("caption", None, tmp_path / "broken.json", tmp_path)
    with pytest.raises(TaskFileError, match="is not a GQA questions file"):
        read_task("gqa", coco_captions, None, tmp_path)


def test_real_photo_set_ships_captions_questions_and_licences():
    photos = json.loads(resources.files("minigpt4").joinpath(REAL_PHOTOS).read_text())["photos"]
    assert len(photos) == 14 and all(photo["licence"] and len(photo["captions"]) >= 3 for photo in photos)
    assert all(len(photo["questions"]) >= 3 for photo in photos)
    samples = read_task("realphotos", None, None, None)
    assert len(samples) == 14 + sum(len(photo["questions"]) for photo in photos)
    assert samples[0].id == "astronaut/caption" and samples[0].prompt == "Briefly describe this image in one sentence."
    assert samples[1].id == "astronaut/q1" and samples[1].question == "What colour is the suit?"
    for image in {sample.image for sample in samples}:  # every photo is where its package installed it
        assert load_image(image).size[0] >= 300, image
    # Questions score 1 for any accepted answer (normalised); captioning samples are left to caption_scores.
    questions = [s for s in samples if s.id.startswith("chelsea/q")]
    assert score("realphotos", questions, {s.id: a for s, a in zip(questions, ["A cat.", "Green", "two", "yes"],
                                                                      strict=True)}) == {"qa_accuracy": 0.75}
