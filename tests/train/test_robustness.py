"""Training under bad conditions: torn logs, full disks, NaN losses, data with nothing usable."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import math
import subprocess
import sys
import tarfile

import pytest
import torch

from minigpt4.config import train_config
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.loop import TrainingDiverged, train

from .conftest import REPO, cli_command, cli_env, overrides, read_log


def tiny_job(tiny_llm_dir, tiny_data, out, *extra):
    return train_config(REPO / "configs" / "tiny_stage1.yaml", overrides(
        tiny_llm_dir, out, [{"kind": "webdataset", "path": tiny_data.shards}],
        "train.epochs=1", "train.iters_per_epoch=4", "train.save_every=2", "train.tensorboard=false", *extra))


def test_a_torn_last_log_line_does_not_break_resume(tiny_llm_dir, tiny_data, tmp_path, caplog):
    """A crash in the middle of writing train_log.jsonl leaves half a line; resume drops it and goes on."""
    out = tmp_path / "out"
    whole = train(tiny_job(tiny_llm_dir, tiny_data, out))
    ckpt.checkpoint_path(out, 4).unlink()  # as if killed after step 3's record, mid-way through step 4's
    log_file = out / "train_log.jsonl"
    lines = log_file.read_text().splitlines()
    log_file.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    with caplog.at_level(logging.WARNING):
        resumed = train(tiny_job(tiny_llm_dir, tiny_data, out, "train.resume=auto"))
    assert resumed.steps == 4 and resumed.final_loss == whole.final_loss
    assert any("line 4 is torn" in r.getMessage() for r in caplog.records)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]  # every line whole again
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert read_log(out)[4]["loss"] == whole.final_loss


def poison_projection(monkeypatch, bad_calls):
    """Make the projection's output NaN on the forward calls numbered in `bad_calls` (1-based): a NaN batch."""
    import minigpt4.train.loop as loop

    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if bad_calls(calls["n"]) else output

    real_build = loop.build_job_model

    def build_and_poison(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.proj.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_job_model", build_and_poison)


def test_a_nan_batch_skips_its_step_and_is_counted(tiny_llm_dir, tiny_data, tmp_path, monkeypatch):
    poison_projection(monkeypatch, lambda call: call in (3, 5))
    out = tmp_path / "out"
    result = train(tiny_job(tiny_llm_dir, tiny_data, out, "train.iters_per_epoch=6", "train.save_every=3"))
    assert result.steps == 6 and result.nonfinite_steps == 2
    assert [math.isfinite(loss) for loss in result.losses] == [True, True, False, True, False, True]
    logged = read_log(out)
    assert [logged[s]["loss"] is None for s in range(1, 7)] == [False, False, True, False, True, False]
    assert logged[6]["nonfinite_steps"] == 2
    state = ckpt.load_checkpoint(result.checkpoint)
    assert state["nonfinite_steps"] == 2
    # AdamW applied to NaN gradients would have made every weight NaN: the two steps were really skipped.
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_nan_steps_in_a_row_stop_the_run_with_the_last_good_weights(tiny_llm_dir, tiny_data, tmp_path, monkeypatch):
    poison_projection(monkeypatch, lambda call: call >= 3)  # from step 3 on, every batch
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"not finite in 4 steps in a row \(steps 3-6, "):
        train(tiny_job(tiny_llm_dir, tiny_data, out, "train.iters_per_epoch=10", "train.max_nonfinite_steps=4",
                       "train.keep_last=5"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint_0000000{s}.pth" for s in (2, 4, 6)]
    after_2, after_4, after_6 = (ckpt.load_checkpoint(ckpt.checkpoint_path(out, s))["model"] for s in (2, 4, 6))
    for key, value in after_2.items():
        assert torch.isfinite(value).all()
        assert torch.equal(after_4[key], value) and torch.equal(after_6[key], value), key  # no update after step 2
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(out, 6))["step"] == 6


FILL_THE_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as ENOSPC would
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
"""


def test_a_failed_checkpoint_write_is_one_error_and_the_previous_checkpoint_survives(tmp_path):
    """The kernel refuses the write (file size limit: the same OSError path as a full disk)."""
    previous = ckpt.checkpoint_path(tmp_path, 2)
    ckpt.save_atomic({"format": ckpt.FORMAT, "step": 2, "w": torch.ones(10)}, previous)
    before = previous.read_bytes()
    script = FILL_THE_DISK + f"""
import torch
from minigpt4.train import checkpoint as ckpt
try:
    state = {{"format": ckpt.FORMAT, "step": 4, "w": torch.ones(100_000)}}
    ckpt.save_atomic(state, ckpt.checkpoint_path({str(tmp_path)!r}, 4))
except ckpt.CheckpointSaveError as err:
    print("CheckpointSaveError", err.errno, err)
"""
    proc = subprocess.run([sys.executable, "-c", script, "20000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"CheckpointSaveError {errno.EFBIG} could not write checkpoint "), proc.stdout
    assert "File too large" in proc.stdout and "previous checkpoint, which is intact" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name]  # no temporary file left behind
    assert previous.read_bytes() == before and torch.load(previous, weights_only=True)["step"] == 2


def test_train_on_a_full_disk_exits_with_one_line_and_resume_still_works(tiny_llm_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    args = overrides(tiny_llm_dir, out, [{"kind": "webdataset", "path": tiny_data.shards}], "train.epochs=1",
                     "train.iters_per_epoch=4", "train.save_every=2", "train.tensorboard=false")
    train(train_config(REPO / "configs" / "tiny_stage1.yaml", args))
    ckpt.checkpoint_path(out, 4).unlink()
    size = ckpt.checkpoint_path(out, 2).stat().st_size
    command = [sys.executable, "-c", FILL_THE_DISK + "from minigpt4.cli import main\nsys.exit(main(sys.argv[2:]))",
               str(size // 2), *cli_command("tiny_stage1.yaml", [*args, "train.resume=auto"])[3:]]
    proc = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "File too large" in errors[0]
    assert "Traceback" not in proc.stderr
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint_00000002.pth"]
    resumed = train(train_config(REPO / "configs" / "tiny_stage1.yaml", [*args, "train.resume=auto"]))
    assert resumed.steps == 4 and ckpt.load_checkpoint(resumed.checkpoint)["step"] == 4


def test_training_on_data_without_a_usable_sample_ends_with_one_error_line(tiny_llm_dir, tmp_path):
    """Every image broken: one pass, then `error: ...` and exit 1 (it used to log skips forever)."""
    from PIL import Image

    from minigpt4.data.synthetic import write_stage1

    square = Image.new("RGB", (8, 8), (255, 0, 0))
    shards = write_stage1(tmp_path / "shards", [(f"{i:05d}", square, "a red square") for i in range(6)], shard_size=3)
    for shard in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(shard) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        with tarfile.open(shard, "w") as dst:
            for member, payload in members:
                payload = b"\xff\xd8 not a jpeg" if member.name.endswith(".jpg") else payload
                member.size = len(payload)
                dst.addfile(member, io.BytesIO(payload))
    args = overrides(tiny_llm_dir, tmp_path / "out", [{"kind": "webdataset", "path": shards}],
                     "train.tensorboard=false")
    proc = subprocess.run(cli_command("tiny_stage1.yaml", args), env=cli_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable sample in a whole pass" in errors[0] and "6 corrupt image" in errors[0]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("skipped ") <= 6 + 1  # one pass of warnings, not an endless stream


def test_under_fp16_and_grad_scaler_a_nan_step_is_skipped_and_lowers_the_scale(tiny_llm_dir, tiny_data, tmp_path,
                                                                               monkeypatch):
    """The AMP path (GradScaler on), run on the CPU: the refusal of fp16 on CPU is lifted for this test only."""
    import minigpt4.train.loop as loop

    real_check = loop.check_config
    monkeypatch.setattr(loop, "check_config", lambda cfg: real_check(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, precision="bf16"))))
    poison_projection(monkeypatch, lambda call: call == 2)
    out = tmp_path / "out"
    result = train(tiny_job(tiny_llm_dir, tiny_data, out, "train.precision=fp16", "train.save_every=1",
                            "train.keep_last=4"))
    assert result.steps == 4 and result.nonfinite_steps == 1 and not math.isfinite(result.losses[1])
    scale = {step: ckpt.load_checkpoint(ckpt.checkpoint_path(out, step))["scaler"]["scale"] for step in (1, 2)}
    assert scale[2] == scale[1] / 2  # backed off once at the skipped step, as GradScaler does on an overflow
    assert all(torch.isfinite(v).all() for v in ckpt.load_checkpoint(result.checkpoint)["model"].values())


def test_a_dataset_the_readers_refuse_is_a_config_error(tiny_llm_dir, tmp_path):
    """An aligned folder with fewer pairs than a batch: one ConfigError (the CLI's `error:` line, exit 2)."""
    from PIL import Image

    from minigpt4.config import ConfigError
    from minigpt4.data.synthetic import write_stage2

    square = Image.new("RGB", (8, 8), (0, 0, 255))
    write_stage2(tmp_path / "aligned", [(str(i), square, "a blue square.") for i in range(3)])
    cfg = train_config(REPO / "configs" / "tiny_stage2.yaml", overrides(
        tiny_llm_dir, tmp_path / "out", [{"kind": "aligned", "path": str(tmp_path / "aligned")}],
        "data.batch_size=4", "train.tensorboard=false"))
    with pytest.raises(ConfigError, match=r"data\.datasets: .* has 3 annotations: too few for batch_size 4"):
        train(cfg)
