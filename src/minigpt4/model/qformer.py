"""The BLIP-2 Q-Former, query path only.

MiniGPT-4 never feeds text to the Q-Former: 32 learned queries go through the embeddings LayerNorm,
then 12 post-LN BERT layers (self-attention; cross-attention to the image tokens in every
`cross_attention_freq`-th layer; the query feed-forward). The text feed-forward, word and position
embeddings and the MLM head are not built. `minigpt4.convert` maps the original key names here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import QFormerConfig
from minigpt4.model.vision import attention


class QFormerAttention(nn.Module):
    """BERT attention: q/k/v projections, softmax attention, then LayerNorm(dense(out) + residual)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int, impl: str):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.impl = impl
        self.dropout = cfg.dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, h, N, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(source)), self._heads(self.value(source))
        dropout_p = self.dropout if self.training else 0.0
        out = attention(q, k, v, self.impl, dropout_p)
        out = out.transpose(1, 2).reshape(x.shape)  # (B, h, N, d) -> (B, N, C)
        out = F.dropout(self.out(out), p=self.dropout, training=self.training)
        return self.norm(out + x)


class QFormerFeedForward(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(self.fc2(F.gelu(self.fc1(x))), p=self.dropout, training=self.training)
        return self.norm(out + x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_width: int, has_cross_attention: bool, impl: str):
        super().__init__()
        self.self_attn = QFormerAttention(cfg, cfg.hidden_size, impl)
        self.cross_attn = QFormerAttention(cfg, encoder_width, impl) if has_cross_attention else None
        self.ffn = QFormerFeedForward(cfg)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(queries)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image_tokens)
        return self.ffn(x)


class QFormer(nn.Module):
    """(B, N_img, encoder_width) image tokens -> (B, num_query_tokens, hidden_size)."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, attn_implementation: str = "sdpa"):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"qformer.hidden_size={cfg.hidden_size} is not divisible by qformer.num_heads={cfg.num_heads}"
            )
        self.dropout = cfg.dropout
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, encoder_width, i % cfg.cross_attention_freq == 0, attn_implementation)
            for i in range(cfg.num_layers)
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        # The queries pass through the BERT embeddings LayerNorm (and dropout) like word embeddings would.
        x = F.dropout(self.embed_norm(queries), p=self.dropout, training=self.training)
        for layer in self.layers:
            x = layer(x, image_tokens)
        return x
