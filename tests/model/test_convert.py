"""Loading the original checkpoint files: exact round trips and strict, named failures."""

from __future__ import annotations

import re

import pytest
import torch

from minigpt4 import MiniGPT4
from minigpt4.convert import CheckpointError, read_checkpoint
from tests.model.original_layout import to_original_keys, write_original_files


@pytest.fixture
def original_files(tiny_model, tmp_path):
    with torch.no_grad():
        for layer in tiny_model.vision.encoder.layers:  # non-zero q/v biases, so the bias layout is exercised
            q_bias, k_bias, v_bias = layer.self_attn.qkv.bias.chunk(3)
            q_bias.normal_()
            v_bias.normal_()
    return write_original_files(tiny_model, tmp_path)


def _load(paths, tiny_config, projection=True):
    return MiniGPT4.from_original(
        vit=paths["eva"],
        blip2=paths["blip2"],
        llm=tiny_config.llm.path,
        projection=paths["proj"] if projection else None,
        config=tiny_config,
    )


def test_original_layout_round_trip_gives_identical_outputs(tiny_model, tiny_config, original_files, photo):
    from minigpt4.processing.image import eval_transform

    loaded = _load(original_files, tiny_config)
    pixels = eval_transform()(photo).unsqueeze(0)
    for name, tensor in tiny_model.tower_state_dict().items():
        assert torch.equal(tensor, loaded.tower_state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_images(pixels), loaded.encode_images(pixels))
        texts = ["a cat lying on a blanket"]
        assert torch.equal(tiny_model.loss(pixels, texts), loaded.loss(pixels, texts))
    assert not any(p.is_meta for p in loaded.parameters())
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]


def test_eva_file_with_a_missing_tensor_names_it(tiny_model, tiny_config, original_files):
    eva = torch.load(original_files["eva"], weights_only=True)
    del eva["blocks.1.attn.q_bias"]
    torch.save(eva, original_files["eva"])
    message = r"eva\.pth does not fit the model: missing keys: blocks\.1\.attn\.q_bias$"  # the file's name for it
    with pytest.raises(CheckpointError, match=message):
        _load(original_files, tiny_config)


@pytest.mark.parametrize("name", ["blocks.1.mlp.fc1.weight", "cls_token"])
def test_eva_file_lacking_a_tensor_names_it_as_the_file_does(tiny_model, tiny_config, original_files, name):
    eva = torch.load(original_files["eva"], weights_only=True)
    del eva[name]
    torch.save(eva, original_files["eva"])
    with pytest.raises(CheckpointError, match=rf"eva\.pth does not fit the model: missing keys: {re.escape(name)}$"):
        _load(original_files, tiny_config)


def test_blip2_file_lacking_a_qformer_tensor_names_it_as_the_file_does(tiny_model, tiny_config, original_files):
    ckpt = torch.load(original_files["blip2"], weights_only=True)
    name = "Qformer.bert.encoder.layer.0.crossattention.self.key.bias"
    del ckpt["model"][name]
    torch.save(ckpt, original_files["blip2"])
    with pytest.raises(CheckpointError, match=rf"missing keys: {re.escape(name)}$"):
        _load(original_files, tiny_config)


def test_blip2_file_without_ln_vision_is_an_error(tiny_model, tiny_config, original_files):
    ckpt = torch.load(original_files["blip2"], weights_only=True)
    del ckpt["model"]["ln_vision.weight"]
    torch.save(ckpt, original_files["blip2"])
    with pytest.raises(CheckpointError, match=r"missing keys: ln_vision\.weight"):
        _load(original_files, tiny_config)


def test_blip2_file_with_an_unknown_tensor_names_it(tiny_model, tiny_config, original_files):
    ckpt = torch.load(original_files["blip2"], weights_only=True)
    ckpt["model"]["Qformer.bert.encoder.layer.0.attention.self.rotary"] = torch.zeros(3)
    torch.save(ckpt, original_files["blip2"])
    message = r"unexpected keys: Qformer\.bert\.encoder\.layer\.0\.attention\.self\.rotary"
    with pytest.raises(CheckpointError, match=message):
        _load(original_files, tiny_config)


def test_eva_blocks_must_be_contiguous(tiny_model, tiny_config, original_files):
    eva = torch.load(original_files["eva"], weights_only=True)
    eva = {k.replace("blocks.1.", "blocks.5.", 1): v for k, v in eva.items()}
    torch.save(eva, original_files["eva"])
    with pytest.raises(CheckpointError, match="not contiguous"):
        _load(original_files, tiny_config)


def test_projection_for_another_llm_size_says_so(tiny_model, tiny_config, original_files, tmp_path):
    # A 13B projection (5120 x Q-Former width) given to an LLM of another width.
    width = tiny_config.qformer.hidden_size
    path = tmp_path / "pretrained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(5120, width), "llama_proj.bias": torch.zeros(5120)}}, path)
    model = _load(original_files, tiny_config, projection=False)
    from minigpt4.convert import load_projection

    with pytest.raises(CheckpointError, match=r"hidden size 5120 \(a 13B LLaMA/Vicuna\).*hidden size 64"):
        load_projection(model, path)


def test_7b_projection_on_13b_llm_message(tmp_path):
    """The 7B/13B mix-up, at the real widths: the message names both models."""
    from types import SimpleNamespace

    from minigpt4.convert import load_projection

    path = tmp_path / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 768), "llama_proj.bias": torch.zeros(4096)}}, path)
    fake_13b = SimpleNamespace(proj=torch.nn.Linear(768, 5120))
    with pytest.raises(CheckpointError, match=r"4096 \(a 7B LLaMA/Vicuna\).*5120 \(a 13B LLaMA/Vicuna\)"):
        load_projection(fake_13b, path)


def test_projection_checkpoint_without_llama_proj(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"something.else": torch.zeros(2)}}, path)
    from minigpt4.convert import projection_state_dict

    with pytest.raises(CheckpointError, match="no llama_proj.weight"):
        projection_state_dict(read_checkpoint(path), str(path))


def test_html_page_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "eva_vit_g.pth"
    path.write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")
    with pytest.raises(CheckpointError, match="HTML/XML page.*failed download"):
        read_checkpoint(path)


def test_truncated_checkpoint_is_reported(tiny_model, original_files):
    data = original_files["blip2"].read_bytes()
    original_files["blip2"].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(original_files["blip2"])


def test_empty_and_foreign_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(empty)
    text = tmp_path / "notes.pth"
    text.write_text("just some text")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(text)


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.pth"
    torch.save({"model": argparse.Namespace(payload=1)}, path)  # any non-allow-listed class
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_checkpoint(path)


def test_inverse_map_covers_every_tower_tensor(tiny_model):
    parts = to_original_keys(tiny_model.tower_state_dict())
    # Each block's one qkv.bias is EVA's q_bias and v_bias.
    assert sum(len(p) for p in parts.values()) == len(tiny_model.tower_state_dict()) + tiny_model.config.vision.depth


# Our Q-Former names before the towers were transformers' (format_version 1), from the original names.
FORMER_QFORMER_NAMES = [
    (r"^embeddings\.LayerNorm\.", "embed_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"layers.\1.self_attn."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.self_attn.norm."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.self\.", r"layers.\1.cross_attn."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attn.out."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attn.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"layers.\1.ffn.fc1."),
    (r"^encoder\.layer\.(\d+)\.output_query\.dense\.", r"layers.\1.ffn.fc2."),
    (r"^encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"layers.\1.ffn.norm."),
]


def _former_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tower state dict under the names format_version 1 folders hold: eva_vit_g.pth's under `vision.`,
    our former Q-Former names under `qformer.`."""
    parts = to_original_keys(state)
    former = {f"vision.{k}": v for k, v in parts["eva"].items()}
    former |= {f"proj.{k.removeprefix('llama_proj.')}": v for k, v in parts["proj"].items()}
    for key, tensor in parts["blip2"].items():
        if key == "query_tokens":
            former["qformer.query_tokens"] = tensor
        elif key.startswith("ln_vision."):
            former[key] = tensor
        else:
            rest = key.removeprefix("Qformer.bert.")
            renamed = next(re.sub(p, r, rest) for p, r in FORMER_QFORMER_NAMES if re.match(p, rest))
            former["qformer." + renamed] = tensor
    return former


def test_folder_saved_with_the_former_tower_names_loads_identically(tiny_model, original_files, tmp_path, photo):
    import json

    from safetensors.torch import load_file, save_file

    from minigpt4.processing.image import eval_transform

    folder = tmp_path / "saved-v1"
    tiny_model.save_pretrained(folder)
    former = _former_names(load_file(str(folder / "model.safetensors")))
    assert "vision.blocks.0.attn.q_bias" in former and "qformer.layers.0.cross_attn.query.weight" in former
    save_file(former, str(folder / "model.safetensors"))
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format_version"] == 2
    (folder / "config.json").write_text(json.dumps(meta | {"format_version": 1}))

    loaded = MiniGPT4.from_pretrained(folder)
    for name, tensor in tiny_model.tower_state_dict().items():
        assert torch.equal(tensor, loaded.tower_state_dict()[name]), name
    pixels = eval_transform()(photo).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_images(pixels), loaded.encode_images(pixels))


def test_training_checkpoint_with_the_former_qformer_names_resumes(tiny_config, tmp_path):
    """A trainable Q-Former's training checkpoint from format_version 1 days (`qformer.embed_norm.weight`, ...)."""
    import dataclasses

    from minigpt4.model.build import build_model
    from minigpt4.train import checkpoint as ckpt

    config = dataclasses.replace(tiny_config, qformer=dataclasses.replace(tiny_config.qformer, trainable=True))
    torch.manual_seed(0)
    trained = build_model(config)
    state = ckpt.trainable_state_dict(trained)
    former = _former_names({k: v for k, v in state.items() if k.startswith("qformer.")})
    former |= {k: v for k, v in state.items() if k.startswith("llama_proj.")}
    assert "qformer.embed_norm.weight" in former
    torch.manual_seed(1)
    fresh = build_model(config)
    ckpt.load_trainable_state_dict(fresh, former, "old.pth")
    for name, tensor in trained.qformer.state_dict().items():
        assert torch.equal(tensor, fresh.qformer.state_dict()[name]), name
