"""A tiny stage-2 run in the Llama-2 release's layout: merge4 connector, "[INST] ... [/INST] ", "</s>", pad "$$"."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt4.config import train_config
from minigpt4.convert import CheckpointError, load_projection
from minigpt4.model.build import build_model
from minigpt4.processing.prompt import LLAMA2_TEMPLATE
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.loop import train

from .conftest import REPO, overrides, read_log


def test_tiny_llama2_stage2_trains_and_its_checkpoint_loads_strictly(tiny_llama2_llm_dir, tiny_llm_dir, tiny_data,
                                                                      tmp_path):
    out = tmp_path / "stage2"
    cfg = train_config(REPO / "configs" / "tiny_stage2.yaml", overrides(
        tiny_llama2_llm_dir, out, [{"kind": "aligned", "path": str(tiny_data.aligned)}],
        "model.connector=merge4", "model.llm.pad_token=$$", f"data.prompt_template='{LLAMA2_TEMPLATE}'",
        "data.end_sym=</s>", "train.iters_per_epoch=4", "train.epochs=2", "train.save_every=4"))
    result = train(cfg)
    losses = [record["loss"] for _, record in sorted(read_log(out).items())]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    state = ckpt.load_checkpoint(result.checkpoint)
    assert state["chat"]["template"] == "llama2"
    # 56 px / 14 = 4 x 4 patches, merged 4 at a time: 4 image tokens of 4 x 32 features each.
    assert cfg.model.num_image_tokens == 4 and state["model"]["llama_proj.weight"].shape == (64, 128)

    torch.manual_seed(0)
    model = build_model(cfg.model)
    load_projection(model, result.checkpoint)
    assert torch.equal(model.proj.weight, state["model"]["llama_proj.weight"])
    assert model.chat_defaults.template == "llama2"

    cfg.model.connector, cfg.model.llm.pad_token, cfg.model.llm.path = "qformer", "", str(tiny_llm_dir)
    with pytest.raises(CheckpointError, match="projection of 128-wide image features .* model.connector=qformer"):
        load_projection(build_model(cfg.model), result.checkpoint)
