"""Loading the original checkpoint files: exact round trips and strict, named failures."""

from __future__ import annotations

import pytest
import torch

from minigpt4 import MiniGPT4
from minigpt4.convert import CheckpointError, read_checkpoint
from tests.model.original_layout import to_original_keys, write_original_files


@pytest.fixture
def original_files(tiny_model, tmp_path):
    with torch.no_grad():
        for block in tiny_model.vision.blocks:  # non-zero q/v biases, so the bias layout is exercised
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
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
    with pytest.raises(CheckpointError, match=r"missing keys: vision\.blocks\.1\.attn\.q_bias"):
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
    with pytest.raises(CheckpointError, match=r"unexpected keys: Qformer\.bert\.encoder\.layer\.0\.attention\.self\.rotary"):
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
    assert sum(len(p) for p in parts.values()) == len(tiny_model.tower_state_dict())
