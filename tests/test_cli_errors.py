"""Every usage or input error, in every command, is one line `error: ...` on stderr and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt4.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_JOB = str(REPO / "configs" / "tiny_stage1.yaml")
SHARDS = "data.datasets=[{{kind: webdataset, path: /nowhere/{{00000..00001}}.tar}}]"  # braces doubled for format()
# A cuda index this machine does not have: "no cuda device" without a GPU, "has N devices" with N.
ABSENT_CUDA = f"device=cuda:{torch.cuda.device_count()}"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
no_mps = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")

CASES = [
    # The commands that load a model: no model options, a checkpoint that is not one, a bad device or config.
    *[pytest.param([command, *extra], id=f"{command}-no-model") for command, extra in
      (("chat", ["hi"]), ("caption", ["{dir}"]), ("demo", []), ("serve", []), ("loss", []))],
    *[pytest.param([command, "--checkpoint", path, *extra], id=f"{command}-checkpoint-{name}")
      for command, extra in (("chat", ["hi"]), ("caption", ["{dir}"]), ("demo", []), ("serve", []))
      for name, path in (("missing", "{tmp}/missing"), ("file", "{file}"), ("not-saved", "{dir}"))],
    *[pytest.param([command, "--preset", "tiny", device, *extra], id=f"{command}-{device}", marks=marks)
      for command, extra in (("chat", ["hi"]), ("caption", ["{dir}"]), ("demo", []), ("serve", []), ("loss", []))
      for device, marks in (("device=banana", ()), ("device=cuda", no_cuda), (ABSENT_CUDA, ()),
                            ("device=mps", no_mps), ("device=meta", ()))],
    pytest.param(["chat", "--preset", "nonesuch", "hi"], id="chat-unknown-preset"),
    pytest.param(["chat", "--preset", "tiny", "--config", "{tmp}/missing.yaml", "hi"], id="chat-config-missing"),
    pytest.param(["chat", "--preset", "tiny", "vision.bogus=1", "hi"], id="chat-unknown-key"),
    pytest.param(["chat", "--preset", "tiny", "--image", "{tmp}/missing.png", "hi"], id="chat-image-missing"),
    pytest.param(["chat", "--preset", "tiny", "--top-p", "3", "hi"], id="chat-top-p"),
    pytest.param(["chat", "--preset", "tiny", "llm.quantization=bnb_8bit", "hi"], id="chat-bnb-8bit-without-gpu",
                 marks=no_cuda),
    pytest.param(["chat", "--max-new-tokens", "many", "hi"], id="chat-not-a-number"),
    pytest.param(["caption", "--preset", "tiny", "-o", "{dir}", "{dir}"], id="caption-output-is-folder"),
    pytest.param(["caption", "--preset", "tiny", "-o", "{file}/out.jsonl", "{dir}"], id="caption-output-under-file"),
    pytest.param(["caption", "--preset", "tiny", "@{tmp}/self.txt"], id="caption-list-includes-itself"),
    pytest.param(["caption", "--preset", "tiny", "@{tmp}/a.txt"], id="caption-list-cycle"),
    pytest.param(["caption", "--preset", "tiny", "--batch-size", "0", "{dir}"], id="caption-batch-size"),
    pytest.param(["demo", "--preset", "tiny", "not-an-override"], id="demo-stray-word"),
    pytest.param(["demo", "--preset", "tiny", "--port", "99999"], id="demo-port-out-of-range"),
    pytest.param(["chat", "--preset", "tiny", "--config", "{tmp}/bad.yaml", "hi"], id="chat-config-not-yaml"),
    pytest.param(["chat", "--preset", "tiny", "--config", "{dir}", "hi"], id="chat-config-is-folder"),
    pytest.param(["train", "{tmp}/bad.yaml"], id="train-config-not-yaml"),
    pytest.param(["cache-features", "{tmp}/bad.yaml", "--output", "{tmp}/c"], id="cache-config-not-yaml"),
    pytest.param(["serve", "--port", "http"], id="serve-port-not-a-number"),
    pytest.param(["loss", "--preset", "tiny", "--image", "{tmp}/missing.png"], id="loss-image-missing"),
    pytest.param(["data", "make-shards", "{file}", "--from", "{dir}"], id="data-output-is-file"),
    pytest.param(["data", "make-shards", "{file}/shards", "--from", "{dir}"], id="data-output-under-file"),
    pytest.param(["data", "make-shards", "{tmp}/out", "--from", "{tmp}/missing"], id="data-from-missing"),
    pytest.param(["data", "make-shards", "{tmp}/out", "--captions", "{tmp}/missing.csv"], id="data-table-missing"),
    pytest.param(["data", "make-shards", "{tmp}/out"], id="data-no-source"),
    pytest.param(["data", "check", "--workers", "0", "{dir}"], id="data-check-workers"),
    pytest.param(["data", "frobnicate"], id="data-unknown-action"),
    pytest.param(["train", "{tmp}/missing.yaml"], id="train-config-missing"),
    pytest.param(["train", TINY_JOB, "train.bogus=1"], id="train-unknown-key"),
    pytest.param(["train", TINY_JOB, "model.device=banana"], id="train-device-banana"),
    pytest.param(["train", TINY_JOB, "model.device=cuda"], id="train-device-cuda", marks=no_cuda),
    pytest.param(["train", TINY_JOB, "train.output_dir={file}"], id="train-output-is-file"),
    pytest.param(["cache-features", "{tmp}/missing.yaml", "--output", "{tmp}/cache"], id="cache-config-missing"),
    pytest.param(["cache-features", TINY_JOB, SHARDS, "--output", "{file}"], id="cache-output-is-file"),
    pytest.param(["cache-features", TINY_JOB, SHARDS, "model.device=banana", "--output", "{tmp}/c"], id="cache-device"),
    pytest.param(["cache-features", TINY_JOB, "--output", "{tmp}/cache"], id="cache-no-datasets"),
    pytest.param(["cache-features", TINY_JOB, SHARDS, "--views", "0", "--output", "{tmp}/c"], id="cache-views"),
    pytest.param(["quickstart", "--output", "{file}"], id="quickstart-output-is-file"),
    pytest.param(["quickstart", "--device", "banana"], id="quickstart-device-banana"),
    pytest.param(["quickstart", "--device", "cuda"], id="quickstart-device-cuda", marks=no_cuda),
    pytest.param(["quickstart", "--threads", "0"], id="quickstart-threads"),
    pytest.param(["fetch", "nonesuch"], id="fetch-unknown-preset"),
    pytest.param(["apply-delta", "--base", "{tmp}/missing", "--delta", "{dir}", "--output", "{tmp}/o"],
                 id="apply-delta-base-missing"),
    pytest.param(["make-delta", "--base", "{file}", "--target", "{file}", "--output", "{tmp}/o"],
                 id="make-delta-base-is-file"),
    pytest.param([], id="no-command"),
    pytest.param(["frobnicate"], id="unknown-command"),
]


@pytest.fixture
def places(tmp_path):
    """Paths for the bad inputs: a file, a folder that holds no model, list files that include themselves."""
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "self.txt").write_text(f"@{tmp_path / 'self.txt'}\n")
    (tmp_path / "a.txt").write_text(f"# a cycle through b\n@{tmp_path / 'b.txt'}\n")
    (tmp_path / "b.txt").write_text(f"@{tmp_path / 'a.txt'}\n")
    (tmp_path / "bad.yaml").write_text("vision: [1, 2\n")  # an unclosed list
    return {"tmp": str(tmp_path), "file": str(tmp_path / "file"), "dir": str(tmp_path / "dir")}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse's usage errors exit from inside main
        return exit_info.code


@pytest.mark.parametrize("argv", CASES)
def test_bad_input_is_one_error_line_and_status_2(argv, places, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the repository
    monkeypatch.setenv("MINIGPT4_CACHE", str(tmp_path / "cache"))
    status = _run([arg.format(**places) for arg in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    # Exactly one error line, the last thing said (progress lines such as "loading model" may come before it).
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert "Traceback" not in err


def test_no_model_names_the_ways_to_get_one(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIGPT4_CACHE", str(tmp_path / "cache"))  # empty: no fetched minigpt4-7b
    monkeypatch.chdir(tmp_path)  # no ./quickstart/model
    photo.save(tmp_path / "photo.jpg")
    assert main(["chat", "--image", str(tmp_path / "photo.jpg"), "what is this?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model given")
    for way in ("minigpt4 quickstart", "./quickstart/model", "--checkpoint DIR", "minigpt4 fetch minigpt4-7b",
                "--preset tiny"):
        assert way in err, way


def test_device_message_names_field_value_and_fix(capsys):
    assert main(["chat", "--preset", "tiny", "device=banana", "hi"]) == 2
    assert "model.device='banana' is not a torch device; use one of cpu, cuda" in capsys.readouterr().err
    assert main(["quickstart", "--device", "banana"]) == 2
    assert capsys.readouterr().err.startswith("error: --device banana is not a torch device")


@no_cuda
def test_cuda_without_a_gpu_says_to_use_the_cpu(capsys):
    assert main(["loss", "--preset", "tiny", "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "model.device='cuda', but torch finds no cuda device" in err and "use model.device='cpu'" in err


def test_list_cycle_names_the_chain(places, capsys):
    assert main(["caption", "--preset", "tiny", f"@{places['tmp']}/a.txt"]) == 2
    err = capsys.readouterr().err
    assert "a.txt -> @" in err and "b.txt -> @" in err and "includes itself" in err


def test_the_real_entry_point(photo, tmp_path):
    """`python -m minigpt4.cli` (where the CLI module is `__main__`) reports the same one line, with logging on."""
    photo.save(tmp_path / "photo.jpg")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MINIGPT4_CACHE": str(tmp_path)}
    for argv in (["chat", "--image", "photo.jpg", "hi"], ["chat", "--preset", "tiny", "device=banana", "hi"]):
        done = subprocess.run([sys.executable, "-m", "minigpt4.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
        assert ("no model given" if "--preset" not in argv else "model.device='banana'") in done.stderr
