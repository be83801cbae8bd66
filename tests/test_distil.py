"""`minigpt4.distil`: EfficientNet-Lite0 distilled into a small EVA-style ViT, written as eva_vit_g.pth is laid out."""

from __future__ import annotations

import json

import pytest
import torch

from minigpt4.config import ConfigError, ModelConfig, VisionConfig, model_preset
from minigpt4.convert import vision_to_eva
from minigpt4.data.synthetic import SPLIT_SEED_OFFSETS
from minigpt4.distil import (
    DISTIL_FIRST_SEED,
    DistilPlan,
    build_teacher,
    prepare_distilled_vit,
    read_record,
)
from minigpt4.model.build import build_model, random_parts
from minigpt4.model.vision import build_vision_tower

# The embedded-vit student's shape (patch 32 at 224 px, ln_vision's eps) at test dims.
STUDENT = VisionConfig(image_size=224, patch_size=32, width=32, depth=1, num_heads=2, mlp_dim=64, layer_norm_eps=1e-5)
PLAN = DistilPlan(shape_images=24, photo_crops=1, steps=12, batch_size=8, lr=3e-3)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher()


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    from minigpt4.distil import distil_vit

    path = tmp_path_factory.mktemp("distil") / "vit.safetensors"
    return distil_vit(STUDENT, path, PLAN, teacher=teacher)


def test_the_student_learns_the_teacher_tokens(distilled):
    assert distilled.steps == PLAN.steps
    assert distilled.final_loss < 0.9 * distilled.first_loss, distilled
    record = read_record(distilled.path)
    assert record["plan"]["steps"] == PLAN.steps and record["student"]["patch_size"] == 32
    assert 0 < record["held_out_mse"] < 1.2 and -1 <= record["held_out_cosine"] <= 1


def test_the_distilled_file_loads_as_weights_vit_for_a_qformer_trained_from_scratch(distilled, tiny_llm_dir):
    from safetensors.torch import load_file

    cfg = model_preset("embedded-vit")
    cfg.vision, cfg.llm.path, cfg.weights.vit = STUDENT, str(tiny_llm_dir), str(distilled.path)
    model = build_model(cfg)
    stored = load_file(str(distilled.path))
    # eva_vit_g.pth's layout: the keys of the released file (cls_token, pos_embed, patch_embed.*, blocks.N.*)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.q_bias"} <= stored.keys()
    # and back: the same tensors the reader of the released file assigned
    assert {f"vision.{k}": v for k, v in vision_to_eva(model.vision.state_dict(), 'model').items()}.keys() == {
        f"vision.{k}" for k in stored}
    for key, tensor in vision_to_eva(model.vision.state_dict(), 'model').items():
        assert torch.equal(tensor, stored[key]), key
    with torch.no_grad():
        assert model.frozen_features(torch.randn(2, 3, 224, 224)).shape == (2, 50, 32)  # CLS + 7x7 patches
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.qformer.parameters())
    assert random_parts(cfg, cfg.llm.path) == ["LLM", "Q-Former", "projection"]


def test_weights_vit_alone_needs_a_trainable_qformer(tiny_config, distilled):
    tiny_config.vision, tiny_config.weights.vit = STUDENT, str(distilled.path)
    with pytest.raises(ConfigError, match=r"weights.vit alone with model.qformer.trainable=true"):
        build_model(tiny_config)


def test_prepare_reuses_a_matching_file_and_remakes_a_stale_one(teacher, tmp_path, monkeypatch):
    import minigpt4.distil as distil

    made = []
    real = distil.distil_vit

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, teacher=teacher, **kwargs)

    monkeypatch.setattr(distil, "distil_vit", counting)
    plan = DistilPlan(shape_images=8, photo_crops=0, steps=2, batch_size=4)
    path = tmp_path / "vit.safetensors"
    assert prepare_distilled_vit(STUDENT, path, plan) == (path, True)
    assert prepare_distilled_vit(STUDENT, path, plan) == (path, False)
    assert len(made) == 1
    # Another plan, or a record of another recipe version, is made again rather than trusted.
    assert prepare_distilled_vit(STUDENT, path, DistilPlan(shape_images=8, photo_crops=0, steps=3, batch_size=4))[1]
    record = json.loads(path.with_name(path.name + ".json").read_text())
    record["version"] = "0"
    path.with_name(path.name + ".json").write_text(json.dumps(record))
    assert prepare_distilled_vit(STUDENT, path, plan)[1]
    assert len(made) == 3
    assert not list(tmp_path.glob("*.partial*"))


def test_distillation_images_are_none_a_quickstart_trains_or_scores_on():
    # Run seed s draws each split from s * 10_000_000 + its offset on, fewer than 1_000_000 images per split.
    for name, offset in SPLIT_SEED_OFFSETS.items():
        assert not offset <= DISTIL_FIRST_SEED < offset + 1_000_000, name
        assert offset + 1_000_000 <= DISTIL_FIRST_SEED or offset >= DISTIL_FIRST_SEED + 1_000_000, name
    assert DISTIL_FIRST_SEED + 1_000_000 <= 10_000_000  # below run seed 1's first split


def test_vision_to_eva_refuses_a_key_bias_and_unknown_names():
    state = build_vision_tower(ModelConfig(vision=STUDENT)).state_dict()
    assert {k for k in vision_to_eva(state, 'test') if k.startswith("blocks.0.attn")} == {
        "blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias"}
    state["encoder.layers.0.self_attn.qkv.bias"][40] = 1.0  # in the key third (width 32)
    with pytest.raises(ValueError, match="nonzero key bias"):
        vision_to_eva(state, 'test')
    with pytest.raises(ValueError, match="post_layernorm.weight has no eva_vit_g.pth name"):
        vision_to_eva({"post_layernorm.weight": torch.ones(32)}, "test")
