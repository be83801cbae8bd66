"""`minigpt4 eval` end to end on the tiny model: every task, the results file, resume (also after a kill)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minigpt4.chat.generation import GenerationSettings, generate
from minigpt4.chat.templates import Message, get_template
from minigpt4.cli import main
from minigpt4.eval.tasks import SHORT_ANSWER, read_task, score
from minigpt4.processing.image import eval_transform, load_image
from tests.eval.conftest import write_json, write_lines

SRC = Path(__file__).resolve().parents[2] / "src"


def _argv(task: str, llm: Path, *rest: str) -> list[str]:
    """`minigpt4 eval TASK` on the tiny model (overrides go right after the task)."""
    return ["eval", task, f"llm.path={llm}", "--preset", "tiny", *rest]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def folder_task(photo, tmp_path) -> Path:
    photo.save(tmp_path / "cat.png")
    photo.rotate(90, expand=True).save(tmp_path / "side.png")
    return write_lines(tmp_path / "qa.jsonl", [
        {"image": "cat.png", "question": "What animal is this?", "answer": "cat"},
        {"image": "side.png", "question": "How many cats?", "answers": ["1", "1", "one", "2"], "id": "count"},
        {"image": "gone.png", "question": "Is it there?", "answer": "no"}])


def test_folder_task_end_to_end(tiny_llm_dir, tiny_model, folder_task, tmp_path, capsys):
    out = tmp_path / "run"
    args = _argv("folder", tiny_llm_dir, "--questions", str(folder_task), "-o", str(out), "--max-new-tokens", "4",
                 "--batch-size", "2", "--seed", "7")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "eval folder: 2 scored (2 new, 0 already done, 1 skipped)" in captured.out
    assert "gone.png" in captured.err  # the missing image is skipped, counted and named
    predictions = _lines(out / "predictions.jsonl")
    assert [p["id"] for p in predictions] == ["1", "count"]

    # The predictions are the chat engine's greedy answers to the short-answer prompt with each question.
    template = get_template(tiny_model.chat_defaults.template, tiny_model.tokenizer)
    transform = eval_transform(tiny_model.config.vision.image_size)
    samples = read_task("folder", folder_task, None, None)[:2]
    prompts = [template.render([Message("user", SHORT_ANSWER.replace("{question}", s.question), images=1)])
               for s in samples]
    expected = generate(tiny_model, prompts, [[transform(load_image(s.image))] for s in samples],
                        GenerationSettings(max_new_tokens=4, do_sample=False), template_stops=template.stop,
                        add_bos=template.add_bos)
    assert [p["prediction"] for p in predictions] == [c.text.strip() for c in expected]

    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == score("folder", samples, {p["id"]: p["prediction"] for p in predictions})
    assert results["samples"] == ["1", "count"] and results["seed"] == 7 and len(results["skipped"]) == 1
    assert results["settings"]["generation"]["do_sample"] is False
    assert results["settings"]["generation"]["max_new_tokens"] == 4
    assert results["settings"]["prompt"] == SHORT_ANSWER
    assert results["model"]["preset"] == "tiny" and results["model"]["overrides"] == [f"llm.path={tiny_llm_dir}"]
    assert set(results["metric_versions"]) >= {"pycocoevalcap", "minigpt4"}

    # A rerun has nothing left to predict; a rerun with another prompt is refused, not mixed in.
    assert main(args) == 0
    assert "0 new, 2 already done" in capsys.readouterr().out
    assert _lines(out / "predictions.jsonl") == predictions
    assert main([*args, "--prompt", "Q: {question} A:"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds predictions made with other prompt" in err


def test_a_cut_off_last_line_is_dropped_and_predicted_again(tiny_llm_dir, folder_task, tmp_path, capsys):
    out = tmp_path / "run"
    args = _argv("folder", tiny_llm_dir, "--questions", str(folder_task), "-o", str(out), "--max-new-tokens", "3")
    assert main(args) == 0
    whole = (out / "predictions.jsonl").read_text()
    first, second = whole.splitlines()
    (out / "predictions.jsonl").write_text(first + "\n" + second[: len(second) // 2])  # killed mid-write
    assert main(args) == 0
    assert "1 new, 1 already done" in capsys.readouterr().out
    assert (out / "predictions.jsonl").read_text() == whole


@pytest.fixture
def question_files(tmp_path, coco_images):
    vqa_questions = write_json(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014", "questions": [
            {"image_id": 1, "question": "What animal is this?", "question_id": 10},
            {"image_id": 3, "question": "What colour is it?", "question_id": 30}]})
    vqa_annotations = write_json(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 10, "image_id": 1, "answers": [{"answer": "cat", "answer_id": i} for i in range(10)]},
        {"question_id": 30, "image_id": 3, "answers": [{"answer": "orange", "answer_id": i} for i in range(10)]}]})
    gqa = write_json(tmp_path / "testdev_balanced_questions.json", {
        "7": {"imageId": "COCO_val2014_000000000001", "question": "What animal is it?", "answer": "cat"}})
    pope = write_lines(tmp_path / "coco_pope_adversarial.json", [
        {"question_id": i, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a {thing} in the image?",
         "label": label} for i, (thing, label) in enumerate([("cat", "yes"), ("dog", "no"), ("car", "no")], 1)])
    return {"vqav2": ["--questions", str(vqa_questions), "--annotations", str(vqa_annotations)],
            "okvqa": ["--questions", str(vqa_questions), "--annotations", str(vqa_annotations)],
            "gqa": ["--questions", str(gqa)], "pope": ["--questions", str(pope)]}


@pytest.mark.parametrize(("task", "count", "metrics"), [
    ("vqav2", 2, {"accuracy"}), ("okvqa", 2, {"accuracy"}), ("gqa", 1, {"accuracy"}),
    ("pope", 3, {"accuracy", "precision", "recall", "f1", "yes_ratio"})])
def test_question_tasks_end_to_end(tiny_llm_dir, question_files, coco_images, tmp_path, task, count, metrics,
                                   capsys):
    out = tmp_path / task
    assert main(_argv(task, tiny_llm_dir, *question_files[task], "--images", str(coco_images), "-o", str(out),
                      "--max-new-tokens", "3")) == 0
    assert f"{count} scored ({count} new, 0 already done, 0 skipped)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == metrics and len(results["samples"]) == count
    assert all(0.0 <= value <= 1.0 for value in results["metrics"].values())
    assert len(_lines(out / "predictions.jsonl")) == count


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")
def test_caption_task_end_to_end(tiny_llm_dir, coco_captions, coco_images, tmp_path, capsys):
    out = tmp_path / "caption"
    assert main(_argv("caption", tiny_llm_dir, "--annotations", str(coco_captions), "--images", str(coco_images),
                      "-o", str(out), "--max-new-tokens", "5")) == 0
    assert "2 scored (2 new" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert results["samples"] == ["1", "2"]
    assert results["settings"]["prompt"] == "Briefly describe this image in one sentence."


def test_usage_errors_are_one_line(tiny_llm_dir, folder_task, tmp_path, capsys):
    out = ["-o", str(tmp_path / "x")]
    cases = [
        (_argv("vqav2", tiny_llm_dir, "--questions", str(folder_task), *out),
         "eval vqav2 needs --annotations and --images"),
        (_argv("folder", tiny_llm_dir, "--questions", str(folder_task), "--prompt", "Describe it.", *out),
         "has no {question}"),
        (_argv("folder", tiny_llm_dir, "--questions", str(folder_task), "--batch-size", "0", *out),
         "--batch-size must be"),
        (_argv("folder", tiny_llm_dir, "--questions", str(tmp_path / "none.jsonl"), *out), "none.jsonl: no such file"),
        (_argv("folder", tiny_llm_dir, "--questions", str(folder_task), "--top-p", "3", *out), "top_p=3.0"),
        (["eval", "folder", "not-an-override", "--questions", str(folder_task), *out], "is not a section.key=value"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x" / "predictions.jsonl").exists()


def test_resume_after_a_kill(tiny_llm_dir, photo, tmp_path, capsys):
    photo.save(tmp_path / "cat.png")
    total = 300
    questions = write_lines(tmp_path / "qa.jsonl", [
        {"image": "cat.png", "question": f"Question {i}?", "answer": "cat"} for i in range(total)])
    out = tmp_path / "run"
    argv = _argv("folder", tiny_llm_dir, "--questions", str(questions), "-o", str(out), "--batch-size", "1",
                 "--max-new-tokens", "6")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    predictions = out / "predictions.jsonl"
    with open(tmp_path / "err.txt", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "minigpt4.cli", *argv], env=env, cwd=tmp_path,
                                   stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not (predictions.exists() and predictions.read_text().count("\n") >= 3):
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()
                time.sleep(0.05)
            process.kill()  # SIGKILL: no cleanup, possibly mid-write
            process.wait(timeout=60)
        finally:
            process.kill()
    before = predictions.read_text()
    done_before = before.count("\n")
    assert 3 <= done_before < total  # killed part way

    assert main(argv) == 0
    assert f"{total} scored ({total - done_before} new, {done_before} already done" in capsys.readouterr().out
    ids = [record["id"] for record in _lines(predictions)]
    assert len(ids) == len(set(ids)) == total and set(ids) == {str(i) for i in range(1, total + 1)}
    assert predictions.read_text().startswith(before.rsplit("\n", 1)[0])  # what was there is kept as it was


def test_torchrun_shards_resume_and_merge(tiny_llm_dir, photo, tmp_path, capsys):
    """Two processes share the samples, a stopped sharded run's files count as done, and process 0 merges all into
    one predictions.jsonl with the answers one process gives."""
    photo.save(tmp_path / "cat.png")
    total = 7
    questions = write_lines(tmp_path / "qa.jsonl", [
        {"image": "cat.png", "question": f"Question {i}?", "answer": "cat"} for i in range(total)])
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--questions", str(questions), "--batch-size", "1", "--max-new-tokens", "4"]
    assert main(_argv("folder", tiny_llm_dir, *common, "-o", str(one))) == 0
    capsys.readouterr()
    alone = {record["id"]: record for record in _lines(one / "predictions.jsonl")}

    # What a stopped 3-process run left: rank 2's file with sample 3 and a line cut off mid-write.
    two.mkdir()
    shutil.copy(one / "run.json", two / "run.json")
    (two / "predictions.rank2.jsonl").write_text(json.dumps(alone["3"]) + "\n" + json.dumps(alone["6"])[:20])
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "minigpt4.cli", *_argv("folder", tiny_llm_dir, *common, "-o", str(two))]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"eval folder: {total} scored ({total - 1} new, 1 already done, 0 skipped)" in proc.stdout
    assert "process 0 of 2" in proc.stderr and "process 1 of 2" in proc.stderr
    assert proc.stdout.count("eval folder:") == 1  # only process 0 scores and reports
    assert sorted(path.name for path in two.iterdir()) == ["predictions.jsonl", "results.json", "run.json"]
    merged = _lines(two / "predictions.jsonl")
    assert [record["id"] for record in merged] == [str(i) for i in range(1, total + 1)]
    assert merged == [alone[str(i)] for i in range(1, total + 1)]
    results = json.loads((two / "results.json").read_text())
    assert results["settings"]["processes"] == 2 and len(results["samples"]) == total


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")
def test_real_photos_end_to_end(tiny_llm_dir, tmp_path, capsys):
    out = tmp_path / "real"
    assert main(_argv("realphotos", tiny_llm_dir, "-o", str(out), "--limit", "10", "--max-new-tokens", "3")) == 0
    assert "10 scored (10 new, 0 already done, 0 skipped)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr",
                                       "qa_accuracy"}
    assert results["samples"][:2] == ["astronaut/caption", "astronaut/q1"]
