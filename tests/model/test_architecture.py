"""Shapes, key names and parameter counts at the real MiniGPT-4 dims (built on the meta device)."""

from __future__ import annotations

import torch
from transformers import Blip2QFormerModel, Blip2VisionModel

from minigpt4.config import ModelConfig, QFormerConfig, VisionConfig
from minigpt4.model.qformer import QFormer
from minigpt4.model.vision import EvaViT, interpolate_pos_embed, tower_configs


def _meta(builder):
    with torch.device("meta"):
        return builder()


def test_eva_vit_g_shapes_and_parameter_count():
    vit = _meta(lambda: EvaViT(tower_configs(ModelConfig())[0]))
    assert isinstance(vit, Blip2VisionModel)  # transformers' own module
    state = vit.state_dict()
    assert len(vit.encoder.layers) == 39
    assert state["embeddings.position_embedding"].shape == (1, 257, 1408)
    assert state["embeddings.class_embedding"].shape == (1, 1, 1408)
    assert state["encoder.layers.0.self_attn.qkv.weight"].shape == (4224, 1408)
    assert state["encoder.layers.0.self_attn.qkv.bias"].shape == (4224,)  # q, k (always zero in EVA), v
    assert state["encoder.layers.38.mlp.fc1.weight"].shape == (6144, 1408)
    assert not any(k.startswith("post_layernorm.") for k in state)  # no final norm: ln_vision follows the tower
    zero_key_biases = 39 * 1408
    assert sum(p.numel() for p in vit.parameters()) - zero_key_biases == 985_894_528  # reference.md §11
    assert vit.encoder.layers[0].layer_norm1.eps == 1e-6
    assert vit.config._attn_implementation == "sdpa"


def test_eva_attention_bias_layout_is_q_zero_v():
    torch.manual_seed(0)
    small = ModelConfig(vision=VisionConfig(width=16, depth=1, num_heads=2, mlp_dim=32), attn_implementation="eager")
    vit = EvaViT(tower_configs(small)[0])
    attn = vit.encoder.layers[0].self_attn
    q_bias, k_bias, v_bias = attn.qkv.bias.detach().chunk(3)
    with torch.no_grad():
        q_bias.normal_()
        v_bias.normal_()
    assert not k_bias.any()
    x = torch.randn(1, 5, 16)
    w = attn.qkv.weight
    q = x @ w[:16].T + q_bias
    k = x @ w[16:32].T  # no bias on K
    v = x @ w[32:].T + v_bias
    heads = lambda t: t.view(1, 5, 2, 8).transpose(1, 2)  # noqa: E731  (B, h, N, d)
    probs = ((heads(q) * 8**-0.5) @ heads(k).transpose(-1, -2)).softmax(-1)
    manual = attn.projection((probs @ heads(v)).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(attn(x)[0], manual, rtol=1e-5, atol=1e-6)


def test_qformer_kept_parameters_match_the_reference_count():
    cfg = ModelConfig()
    qformer = _meta(lambda: QFormer(tower_configs(cfg)[1], cfg.qformer.num_query_tokens))
    assert isinstance(qformer, Blip2QFormerModel)  # transformers' own module
    kept = sum(p.numel() for n, p in qformer.named_parameters() if n != "query_tokens")
    assert kept == 105_137_664  # reference.md §11
    assert qformer.query_tokens.numel() == 24_576
    cross = [i for i, layer in enumerate(qformer.encoder.layer) if layer.has_cross_attention]
    assert cross == [0, 2, 4, 6, 8, 10]
    assert qformer.encoder.layer[0].crossattention.attention.key.in_features == 1408
    assert not hasattr(qformer.encoder.layer[0], "intermediate")  # no text feed-forward
    assert qformer.layernorm.eps == 1e-12


def test_projection_parameter_counts_for_7b_and_13b():
    q = QFormerConfig().hidden_size
    assert sum(p.numel() for p in torch.nn.Linear(q, 4096).parameters()) == 3_149_824
    assert sum(p.numel() for p in torch.nn.Linear(q, 5120).parameters()) == 3_937_280


def test_pos_embed_interpolation():
    table = torch.randn(1, 257, 8)
    assert interpolate_pos_embed(table, 256) is table  # 224 px: unchanged
    bigger = interpolate_pos_embed(table, 1024)  # 448 px: 16x16 -> 32x32
    assert bigger.shape == (1, 1025, 8)
    assert torch.equal(bigger[:, :1], table[:, :1])  # the CLS entry is kept as is


def test_default_config_is_the_release():
    cfg = ModelConfig()
    assert (cfg.vision.depth, cfg.vision.width, cfg.vision.num_heads, cfg.vision.mlp_dim) == (39, 1408, 16, 6144)
    assert (cfg.vision.layer_norm_eps, cfg.vision.ln_vision_eps) == (1e-6, 1e-5)
    assert (cfg.qformer.num_query_tokens, cfg.qformer.hidden_size, cfg.qformer.num_layers) == (32, 768, 12)
    assert cfg.qformer.trainable is False
