"""Training the projection in front of an int8 (torchao) frozen LLM: it works, and follows the fp32 run."""

from __future__ import annotations

import pytest
import torch

from minigpt4.config import train_config
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.loop import train

from .conftest import REPO, overrides

pytest.importorskip("torchao")


def test_training_with_an_int8_llm_follows_the_fp32_run(tiny_llm_dir, tiny_data, tmp_path):
    results = {}
    for quantization in ("none", "int8"):
        cfg = train_config(REPO / "configs" / "tiny_stage1.yaml", overrides(
            tiny_llm_dir, tmp_path / quantization, [{"kind": "webdataset", "path": tiny_data.shards}],
            f"model.llm.quantization={quantization}", "train.epochs=1", "train.iters_per_epoch=3",
            "train.tensorboard=false"))
        results[quantization] = train(cfg)
    fp32, int8 = results["none"], results["int8"]
    assert len(int8.losses) == 3 and int8.losses == pytest.approx(fp32.losses, rel=1e-3)
    # Only the projection trained, and it took (nearly) the fp32 run's steps: Adam's steps are ~lr whatever the
    # gradient's size, so the tiny gradient differences int8 makes show up as ~1e-4 moves (measured: 0.2% of the norm).
    fp32_state = ckpt.load_checkpoint(fp32.checkpoint)["model"]
    int8_state = ckpt.load_checkpoint(int8.checkpoint)["model"]
    assert set(int8_state) == set(fp32_state) and not any(k.startswith("llm.") for k in int8_state)
    for name, tensor in fp32_state.items():
        assert torch.linalg.norm(int8_state[name] - tensor) < 0.01 * torch.linalg.norm(tensor), name
