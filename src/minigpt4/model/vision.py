"""Frozen vision towers, and the one place our typed config becomes transformers' BLIP-2 configs.

EVA-ViT-g/14 (MiniGPT-4's tower, after BLIP-2) is transformers' own `Blip2VisionModel`: 39 pre-norm
blocks, absolute position embeddings, a q/v bias but no k bias (stored as one `qkv.bias` whose key
third is zero). `minigpt4.convert` maps the original `eva_vit_g.pth` / LAVIS key names onto it.

Every tower maps pixels (B, 3, H, W) to tokens (B, N, C) and exposes `num_features` (= C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2VisionConfig, Blip2VisionModel

from minigpt4.config import ModelConfig

# transformers' BLIP-2 vision config initialises random weights with std 1e-10; random towers (tests,
# benchmarks) use BERT's 0.02 instead, so their activations are not all alike. Loaded weights overwrite it.
RANDOM_INIT_STD = 0.02


def tower_configs(cfg: ModelConfig, encoder_width: int | None = None) -> tuple[Blip2VisionConfig, Blip2QFormerConfig]:
    """transformers' configs of our EVA-ViT-g and Q-Former, from `cfg` (the one place this mapping lives).

    `encoder_width` is the width of the tokens the Q-Former attends to: the tower's `num_features`
    (`cfg.vision.width` for EVA-ViT-g, 1280 for EfficientNet-Lite0). The attention kernel is
    `cfg.attn_implementation`, which transformers dispatches.
    """
    vision, qformer = cfg.vision, cfg.qformer
    vision_config = Blip2VisionConfig(
        hidden_size=vision.width,
        intermediate_size=vision.mlp_dim,
        num_hidden_layers=vision.depth,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        layer_norm_eps=vision.layer_norm_eps,
        qkv_bias=True,
        initializer_range=RANDOM_INIT_STD,
        attn_implementation=cfg.attn_implementation,
    )
    qformer_config = Blip2QFormerConfig(
        hidden_size=qformer.hidden_size,
        num_hidden_layers=qformer.num_layers,
        num_attention_heads=qformer.num_heads,
        intermediate_size=qformer.intermediate_size,
        cross_attention_frequency=qformer.cross_attention_freq,
        encoder_hidden_size=vision.width if encoder_width is None else encoder_width,
        layer_norm_eps=qformer.layer_norm_eps,
        hidden_dropout_prob=qformer.dropout,
        attention_probs_dropout_prob=qformer.dropout,
        initializer_range=RANDOM_INIT_STD,
        attn_implementation=cfg.attn_implementation,
    )
    return vision_config, qformer_config


class EvaViT(Blip2VisionModel):
    """EVA-ViT-g/14 as transformers' `Blip2VisionModel`: (B, 3, 224, 224) -> (B, 1 + 16*16, 1408).

    MiniGPT-4's EVA has no final norm: `ln_vision` (eps 1e-5, a separate module of `MiniGPT4`, as in
    the original) follows it. transformers' `post_layernorm` would normalise with the blocks' eps
    (1e-6, its one `layer_norm_eps`), so it is the identity here and the tower returns the last block's
    output; ln_vision then runs at exactly its own eps, and the state dict holds no unused norm.
    """

    def __init__(self, config: Blip2VisionConfig):
        if config.image_size % config.patch_size:
            raise ValueError(f"vision.image_size={config.image_size} is not a multiple of "
                             f"vision.patch_size={config.patch_size}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"vision.width={config.hidden_size} is not divisible by "
                             f"vision.num_heads={config.num_attention_heads}")
        super().__init__(config)
        self.post_layernorm = nn.Identity()  # ln_vision (MiniGPT4.ln_vision) takes its place: see above
        self.image_size = config.image_size
        self.num_features = config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, 1 + N, C) tokens of the last block."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {tuple(pixel_values.shape[-2:])}"
            )
        return super().forward(pixel_values=pixel_values).last_hidden_state


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a (1, 1 + n*n, C) position table to (1, 1 + num_patches, C), bicubic, like EVA does.

    At 224 px the table already fits and is returned unchanged; a 448 px model maps 16x16 -> 32x32.
    """
    extra = num_extra_tokens
    old_side = math.isqrt(pos_embed.shape[1] - extra)
    new_side = math.isqrt(num_patches)
    if old_side == new_side:
        return pos_embed
    head, grid = pos_embed[:, :extra], pos_embed[:, extra:].float()
    width = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, width).permute(0, 3, 1, 2)  # (1, C, n, n)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, width)  # (1, m*m, C)
    return torch.cat([head, grid.to(head.dtype)], dim=1)


def build_vision_tower(cfg: ModelConfig) -> nn.Module:
    """The tower named by `cfg.vision.arch`, with random weights."""
    if cfg.vision.arch == "eva_vit_g":
        return EvaViT(tower_configs(cfg)[0])
    if cfg.vision.arch == "efficientnet_lite0":
        from minigpt4.model.efficientnet import EfficientNetLiteTower

        return EfficientNetLiteTower(cfg.vision)
    raise ValueError(f"vision.arch={cfg.vision.arch!r} is not a known tower (eva_vit_g, efficientnet_lite0)")

