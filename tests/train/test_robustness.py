"""Training under bad conditions: torn logs, full disks, NaN losses, data with nothing usable."""

from __future__ import annotations

import json
import logging

from minigpt4.config import train_config
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.loop import train

from .conftest import REPO, overrides, read_log


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
