"""Optimizer groups, atomic checkpoints and keep-last."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minigpt4.config import TrainConfig
from minigpt4.convert import CheckpointError, load_projection, read_checkpoint
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.optim import build_optimizer


def test_optimizer_groups_follow_parameter_dims(tiny_model):
    opt = build_optimizer(tiny_model, TrainConfig())
    decay, no_decay = opt.param_groups
    assert [p is tiny_model.proj.weight for p in decay["params"]] == [True]
    assert [p is tiny_model.proj.bias for p in no_decay["params"]] == [True]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_optimizer_includes_a_trainable_qformer(tiny_config):
    from minigpt4.model.build import build_model

    tiny_config.qformer.trainable = True
    model = build_model(tiny_config)
    decay, no_decay = build_optimizer(model, TrainConfig()).param_groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert id(model.qformer.query_tokens) in {id(p) for p in decay["params"]}
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_checkpoint_round_trip_and_original_loader(tiny_model, tiny_config, tmp_path):
    from minigpt4.model.build import build_model

    with torch.no_grad():
        tiny_model.proj.weight.fill_(0.25)
    path = ckpt.save_atomic({"format": ckpt.FORMAT, "model": ckpt.trainable_state_dict(tiny_model), "step": 3},
                            ckpt.checkpoint_path(tmp_path, 3))
    state = read_checkpoint(path)  # a partial checkpoint: load_checkpoint would refuse it (no optimizer, ...)
    assert set(state["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    other = build_model(tiny_config)
    load_projection(other, path)  # the loader for the original release files reads it too
    assert torch.equal(other.proj.weight, tiny_model.proj.weight)
    fresh = build_model(tiny_config)
    weight = fresh.proj.weight
    ckpt.load_trainable_state_dict(fresh, state["model"], str(path))
    assert fresh.proj.weight is weight and weight.requires_grad  # copied in: the optimizer's tensors stay valid
    assert torch.equal(fresh.proj.weight, tiny_model.proj.weight)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "release.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(2, 2), "llama_proj.bias": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not a minigpt4 training checkpoint"):
        ckpt.load_checkpoint(path)


def test_keep_last_and_latest(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save_atomic({"format": ckpt.FORMAT, "step": step}, ckpt.checkpoint_path(tmp_path, step))
    (tmp_path / ".checkpoint_00000025.pth.123.tmp").write_bytes(b"partial")
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["checkpoint_00000005.pth", "checkpoint_00000010.pth"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000015.pth", "checkpoint_00000020.pth"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_00000020.pth"


def test_a_crash_during_save_leaves_the_old_checkpoint_whole(tmp_path):
    """Kill the writer (SIGKILL) in the middle of torch.save: the target still holds the old file."""
    target = ckpt.checkpoint_path(tmp_path, 1)
    ckpt.save_atomic({"format": ckpt.FORMAT, "step": 1, "data": torch.zeros(4)}, target)
    before = target.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from minigpt4.train import checkpoint as ckpt
        real_save = torch.save
        def dying_save(obj, fh):
            real_save(obj, fh)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # after writing bytes, before the rename
        torch.save = dying_save
        ckpt.save_atomic({{"format": ckpt.FORMAT, "step": 2, "data": torch.ones(1000)}}, {str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert target.read_bytes() == before
    assert read_checkpoint(target)["step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and os.path.getsize(tmp_path / leftovers[0]) > 0
    assert ckpt.latest_checkpoint(tmp_path) == target  # the torn temp file is never picked for resume


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    import random

    import numpy as np

    device = torch.device("cpu")
    state = ckpt.rng_state(device)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    path = ckpt.save_atomic({"format": ckpt.FORMAT, "rng": [state]}, tmp_path / "checkpoint_00000001.pth")
    ckpt.set_rng_state(read_checkpoint(path)["rng"][0], device)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
