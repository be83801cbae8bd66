"""torchrun with 2 CPU processes (gloo; DDP and FSDP) follows the same loss trajectory as one process with the same
global batch, and so does one process with gradient accumulation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minigpt4.config import train_config
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.loop import train

from .conftest import REPO, cli_command, cli_env, overrides, read_log

STEPS = 6


def test_torchrun_two_processes_match_one_process(tiny_llm_dir, tiny_data, tmp_path):
    # One shard, no shuffle buffer: rank r reads samples r, r+2, ..., so what the two ranks read for one step
    # is exactly the single process's batch of 8 (augmentations are seeded per sample).
    data = [{"kind": "webdataset", "path": tiny_data.one_shard}]
    common = ["data.shuffle_buffer=0", "train.epochs=1", f"train.iters_per_epoch={STEPS}", "train.save_every=3",
              "train.tensorboard=false"]
    one_dir, two_dir, fsdp_dir, accum_dir = tmp_path / "one", tmp_path / "two", tmp_path / "fsdp", tmp_path / "accum"

    config = REPO / "configs" / "tiny_stage1.yaml"
    train(train_config(config, overrides(tiny_llm_dir, one_dir, data, *common, "data.batch_size=8")))
    # DDP with 2 micro-batches of 2 per process (exercises no_sync), FSDP with one batch of 4 per process.
    for output_dir, layout in ((two_dir, ["train.strategy=ddp", "data.batch_size=2", "train.grad_accum=2"]),
                               (fsdp_dir, ["train.strategy=fsdp", "data.batch_size=4"])):
        command = cli_command("tiny_stage1.yaml", overrides(tiny_llm_dir, output_dir, data, *common, *layout))
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    *command[1:]]
        proc = subprocess.run(torchrun, env=cli_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "process 0 of 2" in proc.stderr and "process 1 of 2" not in proc.stderr  # rank 1 logs warnings only
    assert "FSDP: 2 LLM layers, 4 tower blocks" in proc.stderr  # the tiny ViT's 2 blocks, the Q-Former's 2 layers
    # The same global batch as 4 x 2 micro-batches in one process (in this process: no start-up cost).
    train(train_config(config, overrides(tiny_llm_dir, accum_dir, data, *common, "data.batch_size=4",
                                         "train.grad_accum=2")))

    one, two, fsdp, accum = read_log(one_dir), read_log(two_dir), read_log(fsdp_dir), read_log(accum_dir)
    assert sorted(one) == sorted(two) == sorted(fsdp) == sorted(accum) == list(range(1, STEPS + 1))
    losses = [one[s]["loss"] for s in sorted(one)]
    assert len(set(losses)) == STEPS  # the steps really see different data
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
        assert fsdp[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
        assert accum[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), step
        assert two[step]["samples_per_s"] > 0
    final = {d: ckpt.load_checkpoint(ckpt.checkpoint_path(d, STEPS)) for d in (one_dir, two_dir, fsdp_dir)}
    assert len(final[two_dir]["rng"]) == 2  # both ranks' generator states, for an exact resume
    for key, value in final[one_dir]["model"].items():
        torch.testing.assert_close(final[two_dir]["model"][key], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(final[fsdp_dir]["model"][key], value, rtol=1e-4, atol=1e-6)
