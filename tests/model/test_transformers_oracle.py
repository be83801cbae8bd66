"""Our EVA-ViT and Q-Former against transformers' Blip2VisionModel / Blip2QFormerModel (an
independent implementation) given the same weights."""

from __future__ import annotations

import re

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from minigpt4.config import QFormerConfig, VisionConfig
from minigpt4.model.qformer import QFormer
from minigpt4.model.vision import EvaViT
from tests.model.original_layout import to_original_keys

VISION = VisionConfig(width=64, depth=3, num_heads=4, mlp_dim=160)
QFORMER = QFormerConfig(num_query_tokens=8, hidden_size=48, num_layers=4, num_heads=4, intermediate_size=96)


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.2)


def test_vision_tower_matches_blip2_vision_model():
    torch.manual_seed(0)
    ours = EvaViT(VISION).eval()
    ln_vision = torch.nn.LayerNorm(VISION.width, eps=VISION.ln_vision_eps)
    _randomise(ours)
    _randomise(ln_vision)
    hf = Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=VISION.width,
            intermediate_size=VISION.mlp_dim,
            num_hidden_layers=VISION.depth,
            num_attention_heads=VISION.num_heads,
            image_size=VISION.image_size,
            patch_size=VISION.patch_size,
            layer_norm_eps=VISION.layer_norm_eps,
            qkv_bias=True,
            attn_implementation="eager",
        )
    ).eval()
    # HF's post_layernorm stands where ln_vision does; its eps must be set by hand.
    hf.post_layernorm.eps = VISION.ln_vision_eps
    s = {k: v for k, v in ours.state_dict().items()}
    mapped = {
        "embeddings.class_embedding": s["cls_token"],
        "embeddings.position_embedding": s["pos_embed"],
        "embeddings.patch_embedding.weight": s["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": s["patch_embed.proj.bias"],
        "post_layernorm.weight": ln_vision.weight,
        "post_layernorm.bias": ln_vision.bias,
    }
    for i in range(VISION.depth):
        b, h = f"blocks.{i}.", f"encoder.layers.{i}."
        mapped[h + "self_attn.qkv.weight"] = s[b + "attn.qkv.weight"]
        q_bias, v_bias = s[b + "attn.q_bias"], s[b + "attn.v_bias"]
        mapped[h + "self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        for ours_name, hf_name in [("attn.proj", "self_attn.projection"), ("norm1", "layer_norm1"),
                                   ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            mapped[h + hf_name + ".weight"] = s[b + ours_name + ".weight"]
            mapped[h + hf_name + ".bias"] = s[b + ours_name + ".bias"]
    hf.load_state_dict(mapped, strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        actual = ln_vision(ours(pixels))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_qformer_matches_blip2_qformer_model():
    torch.manual_seed(0)
    encoder_width = 40
    ours = QFormer(QFORMER, encoder_width).eval()
    _randomise(ours)
    hf = Blip2QFormerModel(
        Blip2QFormerConfig(
            hidden_size=QFORMER.hidden_size,
            num_hidden_layers=QFORMER.num_layers,
            num_attention_heads=QFORMER.num_heads,
            intermediate_size=QFORMER.intermediate_size,
            cross_attention_frequency=QFORMER.cross_attention_freq,
            encoder_hidden_size=encoder_width,
            layer_norm_eps=QFORMER.layer_norm_eps,
            attn_implementation="eager",
        )
    ).eval()
    # Ours -> the original BLIP-2 names (test helper) -> transformers' names (the renames in the pitfalls note).
    original = to_original_keys({f"qformer.{k}": v for k, v in ours.state_dict().items()})["blip2"]
    query_tokens = original.pop("query_tokens")
    mapped = {}
    for key, tensor in original.items():
        key = key.removeprefix("Qformer.bert.").replace("embeddings.LayerNorm.", "layernorm.")
        key = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", key)
        mapped[key] = tensor
    hf.load_state_dict(mapped, strict=True)
    image_tokens = torch.randn(2, 17, encoder_width)
    with torch.no_grad():
        expected = hf(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=image_tokens).last_hidden_state
        actual = ours(image_tokens)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
