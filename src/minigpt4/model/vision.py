"""Frozen vision towers.

`EvaViT` is EVA-ViT-g/14 as MiniGPT-4 (after BLIP-2) builds it: 39 pre-norm blocks, absolute
position embeddings, a q/v bias but no k bias, and no final norm. Parameter names equal the keys of
`eva_vit_g.pth`, so that file loads without renaming.

Every tower maps pixels (B, 3, H, W) to tokens (B, N, C) and exposes `num_features` (= C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import VisionConfig


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, dropout_p: float = 0.0):
    """Softmax attention over (B, heads, N, D) tensors; "eager" is the textbook formula."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, Nq, Nk)
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs @ v


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class EvaAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, impl: str):
        super().__init__()
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        # EVA stores separate q and v biases; the key projection has none.
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.view(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = attention(q, k, v, self.impl)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class EvaMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EvaAttention(cfg.width, cfg.num_heads, impl)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = EvaMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """EVA-ViT-g/14: (B, 3, 224, 224) -> (B, 1 + 16*16, 1408)."""

    def __init__(self, cfg: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"vision.image_size={cfg.image_size} is not a multiple of vision.patch_size={cfg.patch_size}"
            )
        if cfg.width % cfg.num_heads:
            raise ValueError(f"vision.width={cfg.width} is not divisible by vision.num_heads={cfg.num_heads}")
        self.image_size = cfg.image_size
        self.num_features = cfg.width
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.width))
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.blocks = nn.ModuleList(EvaBlock(cfg, attn_implementation) for _ in range(cfg.depth))
        self._init_weights()

    def _init_weights(self) -> None:
        # Random init for tests and benchmarks; real use overwrites every tensor from eva_vit_g.pth.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for depth, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * depth))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {tuple(pixels.shape[-2:])}"
            )
        x = self.patch_embed(pixels)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, C)
        for block in self.blocks:
            x = block(x)
        return x


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


def build_vision_tower(cfg: VisionConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """The tower named by `vision.arch`, with random weights."""
    if cfg.arch == "eva_vit_g":
        return EvaViT(cfg, attn_implementation)
    if cfg.arch == "efficientnet_lite0":
        from minigpt4.model.efficientnet import EfficientNetLiteTower

        return EfficientNetLiteTower(cfg)
    raise ValueError(f"vision.arch={cfg.arch!r} is not a known tower (eva_vit_g, efficientnet_lite0)")
