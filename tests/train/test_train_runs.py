"""End-to-end training on the tiny model: stage 1 then stage 2, exact resume after SIGKILL, bad data."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from minigpt4.config import train_config
from minigpt4.convert import load_projection
from minigpt4.data.aligned import stage2_batches
from minigpt4.data.prompts import load_prompts
from minigpt4.model.build import build_model
from minigpt4.processing.image import eval_transform
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.loop import TrainingDiverged, train

from .conftest import REPO, cli_command, cli_env, overrides, read_log, run_cli


def mean(values):
    return sum(values) / len(values)


def test_stage1_then_stage2_from_its_checkpoint(tiny_llm_dir, tiny_data, tmp_path, caplog):
    out1, out2 = tmp_path / "stage1", tmp_path / "stage2"
    shards = [{"kind": "webdataset", "path": tiny_data.shards}]
    stage1 = run_cli("tiny_stage1.yaml", overrides(tiny_llm_dir, out1, shards))
    console = stage1.stdout + stage1.stderr
    assert "tokens/s" in console and "samples/s" in console
    assert "final loss" in stage1.stdout
    log1 = read_log(out1)
    losses1 = [log1[s]["loss"] for s in sorted(log1)]
    assert len(losses1) == 20
    assert mean(losses1[-5:]) < mean(losses1[:3]) - 0.1, losses1
    assert all(r["tokens_per_s"] > 0 for r in log1.values())
    assert (out1 / "tensorboard").is_dir() and any((out1 / "tensorboard").iterdir())
    # keep_last 2, saved every 5 steps: 15 and 20 remain
    assert [p.name for p in ckpt.list_checkpoints(out1)] == ["checkpoint_00000015.pth", "checkpoint_00000020.pth"]
    stage1_ckpt = out1 / "checkpoint_00000020.pth"

    with caplog.at_level(logging.INFO):
        result2 = train(train_config(REPO / "configs" / "tiny_stage2.yaml", overrides(
            tiny_llm_dir, out2, [{"kind": "aligned", "path": str(tiny_data.aligned)}],
            f"model.weights.projection={stage1_ckpt}")))
    assert any("tokens/s" in r.getMessage() for r in caplog.records)
    assert result2.tokens_per_second > 0 and result2.checkpoint == out2 / "checkpoint_00000020.pth"
    # Each checkpoint records how to talk to what it trained: its stage's layout as the conversation template.
    assert ckpt.load_checkpoint(stage1_ckpt)["chat"]["template"] == "caption"
    assert ckpt.load_checkpoint(result2.checkpoint)["chat"]["template"] == "vicuna_v0_train"
    log2 = read_log(out2)
    losses2 = [log2[s]["loss"] for s in sorted(log2)]
    assert mean(losses2[-5:]) < mean(losses2[:3]), losses2
    # Per-step losses are on different batches; on one fixed stage-2 batch, the stage-2 weights must beat
    # the stage-1 weights they started from (stage 2 really started there: same frozen towers, same seed).
    cfg = train_config(REPO / "configs" / "tiny_stage2.yaml", overrides(tiny_llm_dir, out2, []))
    cfg.model.llm.path = str(tiny_llm_dir)
    batch = next(stage2_batches(str(tiny_data.aligned), eval_transform(cfg.model.vision.image_size), 8, seed=7))
    prompt = load_prompts(None, cfg.data.prompt_template)[0]

    def fixed_batch_loss(weights: Path) -> float:
        torch.manual_seed(cfg.train.seed)  # the towers the training runs built
        model = build_model(cfg.model)
        load_projection(model, weights)
        with torch.no_grad():
            return float(model.loss(batch["image"], batch["text"], prompt, cfg.data.end_sym, cfg.data.max_txt_len))

    before, after = fixed_batch_loss(stage1_ckpt), fixed_batch_loss(out2 / "checkpoint_00000020.pth")
    assert after < before - 0.02, (before, after)


RESUME_COMMON = ["train.save_every=4", "train.keep_last=3", "train.iters_per_epoch=8", "train.tensorboard=false",
                 "model.qformer.trainable=true", "data.augment=true"]


def resume_data(tiny_data) -> list[dict]:
    return [{"kind": "webdataset", "path": tiny_data.shards, "ratio": 2.0},  # two datasets mixed 2:1 by batch
            {"kind": "webdataset", "path": tiny_data.one_shard, "ratio": 1.0}]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llm_dir, tiny_data, tmp_path_factory) -> Path:
    """The reference: the resume tests' run, never interrupted (in this process, one thread like the CLI runs)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    config = REPO / "configs" / "tiny_stage1.yaml"
    train(train_config(config, overrides(tiny_llm_dir, out, resume_data(tiny_data), *RESUME_COMMON)))
    return out


def assert_same_run(resumed_dir: Path, whole_dir: Path, steps: int = 16) -> None:
    resumed, whole = read_log(resumed_dir), read_log(whole_dir)
    steps_logged = [json.loads(line)["step"] for line in (resumed_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # what the stopped run logged after its checkpoint was dropped
    assert sorted(whole) == list(range(1, steps + 1))
    for step in whole:
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-6, abs=1e-7), step
    final_resumed = ckpt.load_checkpoint(ckpt.checkpoint_path(resumed_dir, steps))["model"]
    final_whole = ckpt.load_checkpoint(ckpt.checkpoint_path(whole_dir, steps))["model"]
    assert final_resumed.keys() == final_whole.keys() and any(k.startswith("qformer.") for k in final_whole)
    for key in final_whole:
        torch.testing.assert_close(final_resumed[key], final_whole[key], rtol=1e-5, atol=1e-6)


def start_run(tiny_llm_dir, tiny_data, out: Path, console: Path, *extra: str) -> subprocess.Popen:
    args = overrides(tiny_llm_dir, out, resume_data(tiny_data), *RESUME_COMMON, *extra)
    command = cli_command("tiny_stage1.yaml", args)
    with console.open("w") as sink:
        return subprocess.Popen(command, env=cli_env(), stdout=sink, stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_kill_and_resume_gives_the_uninterrupted_trajectory(tiny_llm_dir, tiny_data, tmp_path, uninterrupted):
    """SIGKILL a run after its step-4 checkpoint, resume it, and compare with a run that was never killed.

    The Q-Former is trained too here, so dropout draws from the torch RNG that the checkpoint restores,
    images are randomly cropped (augment on), and two datasets are mixed.
    """
    killed_dir, console = tmp_path / "killed", tmp_path / "console.txt"
    proc = start_run(tiny_llm_dir, tiny_data, killed_dir, console)
    wait_for(ckpt.checkpoint_path(killed_dir, 4).exists, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, console.read_text()[-3000:]
    done_before_kill = max(read_log(killed_dir))
    assert 4 <= done_before_kill < 16, "the kill must land mid-run"
    survivors = ckpt.list_checkpoints(killed_dir)
    assert survivors and survivors[-1].name != "checkpoint_00000016.pth"

    config = REPO / "configs" / "tiny_stage1.yaml"
    resumed = train(train_config(config, overrides(tiny_llm_dir, killed_dir, resume_data(tiny_data), *RESUME_COMMON,
                                                   "train.resume=auto")))
    assert resumed.steps == 16 and not resumed.stopped_by_signal
    assert resumed.final_loss == read_log(uninterrupted)[16]["loss"]
    assert_same_run(killed_dir, uninterrupted)


def test_sigterm_saves_and_stops_then_resumes_exactly(tiny_llm_dir, tiny_data, tmp_path, uninterrupted):
    """A scheduler's SIGTERM: the run finishes its step, saves a checkpoint there, exits 143; resume continues."""
    out, console = tmp_path / "terminated", tmp_path / "console.txt"
    proc = start_run(tiny_llm_dir, tiny_data, out, console, "train.save_every=100")  # no periodic checkpoint
    log_file = out / "train_log.jsonl"
    wait_for(lambda: log_file.exists() and len(log_file.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, console.read_text()[-3000:]
    assert "stopped by SIGTERM" in console.read_text()
    stopped_at = max(read_log(out))
    assert 3 <= stopped_at < 16
    assert [p.name for p in ckpt.list_checkpoints(out)] == [ckpt.checkpoint_path(out, stopped_at).name]

    config = REPO / "configs" / "tiny_stage1.yaml"
    train(train_config(config, overrides(tiny_llm_dir, out, resume_data(tiny_data), *RESUME_COMMON,
                                         "train.resume=auto")))
    assert_same_run(out, uninterrupted)


def _corrupt_shards(root: Path, tiny_data) -> str:
    """Copy the two test shards, then break samples: a corrupt jpg, an empty caption, and a truncated tar."""
    root.mkdir()
    sources = sorted(Path(tiny_data.shards).parent.glob("*.tar"))
    good, bad = root / "00000.tar", root / "00001.tar"
    with tarfile.open(sources[0]) as src, tarfile.open(good, "w") as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if member.name == "00003.jpg":
                payload = b"\xff\xd8\xff\xe0 this is not a jpeg"
            if member.name == "00005.json":
                payload = b'{"caption": "   "}'
            if member.name == "00005.txt":
                payload = b""
            member.size = len(payload)
            dst.addfile(member, __import__("io").BytesIO(payload))
    data = sources[1].read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # cut inside a member: the rest of the shard is gone
    return str(root / "{00000..00001}.tar")


def test_corrupt_images_and_a_truncated_tar_are_skipped_and_reported(tiny_llm_dir, tiny_data, tmp_path, caplog):
    pattern = _corrupt_shards(tmp_path / "bad", tiny_data)
    cfg = train_config(REPO / "configs" / "tiny_stage1.yaml", overrides(
        tiny_llm_dir, tmp_path / "out", [{"kind": "webdataset", "path": pattern}],
        "train.epochs=1", "train.iters_per_epoch=8", "train.tensorboard=false"))
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    assert result.steps == 8 and result.final_loss == result.final_loss  # finished, finite
    assert result.skipped >= 3  # at least one pass over both shards: the jpg, the caption, the tar
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert summary and f"skipped {result.skipped} bad samples" in summary[0]
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "00003" in warnings and "00005" in warnings and "00001.tar" in warnings
    assert read_log(tmp_path / "out")[8]["skipped"] == result.skipped


def test_bf16_autocast_on_cpu(tiny_llm_dir, tiny_data, tmp_path):
    cfg = train_config(REPO / "configs" / "tiny_stage1.yaml", overrides(
        tiny_llm_dir, tmp_path / "out", [{"kind": "webdataset", "path": tiny_data.shards}],
        "train.precision=bf16", "train.epochs=1", "train.iters_per_epoch=3", "train.tensorboard=false"))
    result = train(cfg)
    assert len(result.losses) == 3 and all(5.0 < loss < 7.0 for loss in result.losses)
    weights = ckpt.load_checkpoint(result.checkpoint)["model"]["llama_proj.weight"]
    assert weights.dtype == torch.float32  # trainable weights stay fp32 under autocast


def test_non_finite_losses_in_a_row_stop_with_a_checkpoint(tiny_llm_dir, tiny_data, tmp_path):
    """lr 1e30 blows the weights up: from then on every loss is non-finite, and 3 such steps in a row stop the run."""
    cfg = train_config(REPO / "configs" / "tiny_stage1.yaml", overrides(
        tiny_llm_dir, tmp_path / "out", [{"kind": "webdataset", "path": tiny_data.shards}],
        "train.lr=1e30", "train.warmup_steps=0", "train.tensorboard=false", "train.max_nonfinite_steps=3"))
    with pytest.raises(TrainingDiverged, match=r"not finite in 3 steps in a row \(steps (\d+)-(\d+), ") as info:
        train(cfg)
    first, last = map(int, re.search(r"steps (\d+)-(\d+)", str(info.value)).groups())
    saved = re.search(r"saved to (\S+)\.", str(info.value)).group(1)
    assert last == first + 2 and first >= 2  # the first step is finite; every step after the blow-up is not
    assert Path(saved) == ckpt.latest_checkpoint(tmp_path / "out") == ckpt.checkpoint_path(tmp_path / "out", last)
    # Read raw: with lr 1e30 the weights themselves may already be infinite, which load_checkpoint refuses.
    state = torch.load(saved, weights_only=True)
    assert state["step"] == last and state["nonfinite_steps"] == 3
    logged = read_log(tmp_path / "out")
    assert [step for step in sorted(logged) if logged[step]["loss"] is None] == [first, first + 1, last]
    assert logged[last]["nonfinite_steps"] == 3
