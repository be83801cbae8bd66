"""The towers are transformers' Blip2VisionModel / Blip2QFormerModel: loaded from the original (LAVIS) files
through `minigpt4.convert`, they compute what the original network computes. The oracle is the original's
math written out here on the files' own tensors (EVA-ViT blocks, ln_vision, the BERT Q-Former's query path),
independently of both the key maps and transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minigpt4 import MiniGPT4
from tests.model.original_layout import to_original_keys

PATCH = 14


def _linear(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state[name + ".weight"], state[name + ".bias"])


def _norm(state: dict[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Nq, C), (B, Nk, C), (B, Nk, C) -> (B, Nq, C): multi-head softmax(q k^T / sqrt(d)) v."""
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[-1])


def eva_reference(eva: dict[str, torch.Tensor], pixels: torch.Tensor, depth: int, heads: int, eps: float):
    """EVA-ViT-g as LAVIS runs it, on eva_vit_g.pth's tensors: pre-norm blocks, q/v bias, no final norm."""
    x = F.conv2d(pixels, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([eva["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + eva["pos_embed"]
    for i in range(depth):
        p = f"blocks.{i}."
        h = _norm(eva, p + "norm1", x, eps)
        q_bias, v_bias = eva[p + "attn.q_bias"], eva[p + "attn.v_bias"]
        qkv = F.linear(h, eva[p + "attn.qkv.weight"], torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
        x = x + _linear(eva, p + "attn.proj", _softmax_attention(*qkv.chunk(3, dim=-1), heads))
        h = _norm(eva, p + "norm2", x, eps)
        x = x + _linear(eva, p + "mlp.fc2", F.gelu(_linear(eva, p + "mlp.fc1", h)))
    return x


def qformer_reference(blip2: dict[str, torch.Tensor], image: torch.Tensor, layers: int, heads: int, freq: int,
                      eps: float) -> torch.Tensor:
    """The BLIP-2 Q-Former's query path on the LAVIS file's tensors (post-LN BERT, cross-attention every freq)."""
    bert = "Qformer.bert."

    def attention(prefix: str, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = _softmax_attention(_linear(blip2, prefix + "self.query", x), _linear(blip2, prefix + "self.key", context),
                                 _linear(blip2, prefix + "self.value", context), heads)
        return _norm(blip2, prefix + "output.LayerNorm", _linear(blip2, prefix + "output.dense", out) + x, eps)

    queries = blip2["query_tokens"].expand(image.shape[0], -1, -1)
    x = _norm(blip2, bert + "embeddings.LayerNorm", queries, eps)
    for i in range(layers):
        layer = f"{bert}encoder.layer.{i}."
        x = attention(layer + "attention.", x, x)
        if i % freq == 0:
            x = attention(layer + "crossattention.", x, image)
        h = F.gelu(_linear(blip2, layer + "intermediate_query.dense", x))
        x = _norm(blip2, layer + "output_query.LayerNorm", _linear(blip2, layer + "output_query.dense", h) + x, eps)
    return x


@pytest.fixture
def random_original_files(tiny_model, tmp_path):
    """eva_vit_g.pth and a LAVIS BLIP-2 file of the tiny dims, every tensor drawn afresh (std 0.2, so no layer is
    near the identity); only the key names and shapes come from the model."""
    generator = torch.Generator().manual_seed(1)
    parts = to_original_keys(tiny_model.tower_state_dict())
    files = {}
    for name in ("eva", "blip2"):
        drawn = {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in parts[name].items()}
        files[name] = drawn
        torch.save(drawn if name == "eva" else {"model": drawn}, tmp_path / f"{name}.pth")
    return files, tmp_path


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_towers_loaded_from_the_original_files_compute_the_original_network(
    tiny_config, random_original_files, attn_implementation
):
    files, folder = random_original_files
    config = dataclasses.replace(tiny_config, attn_implementation=attn_implementation)
    model = MiniGPT4.from_original(folder / "eva.pth", folder / "blip2.pth", tiny_config.llm.path, config=config)
    assert model.vision.config._attn_implementation == attn_implementation
    assert model.qformer.config._attn_implementation == attn_implementation
    vision, qformer = config.vision, config.qformer
    pixels = torch.randn(2, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = eva_reference(files["eva"], pixels, vision.depth, vision.num_heads, vision.layer_norm_eps)
        image = _norm(files["blip2"], "ln_vision", tokens, vision.ln_vision_eps)  # eps 1e-5, not the blocks' 1e-6
        expected = qformer_reference(files["blip2"], image, qformer.num_layers, qformer.num_heads,
                                     qformer.cross_attention_freq, qformer.layer_norm_eps)
        torch.testing.assert_close(model.ln_vision(model.vision(pixels)), image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.frozen_features(pixels), expected, rtol=1e-5, atol=1e-5)
    assert model.ln_vision.eps == 1e-5 and model.vision.encoder.layers[0].layer_norm1.eps == 1e-6
