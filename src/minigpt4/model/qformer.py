"""The BLIP-2 Q-Former, query path only: transformers' own `Blip2QFormerModel` plus its learned queries.

MiniGPT-4 never feeds text to the Q-Former: 32 learned queries go through the embeddings LayerNorm,
then 12 post-LN BERT layers (self-attention; cross-attention to the image tokens in every
`cross_attention_freq`-th layer; the query feed-forward). transformers builds exactly that (no text
feed-forward, no word or position embeddings, no MLM head); `minigpt4.convert` maps the original key
names onto it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


class QFormer(Blip2QFormerModel):
    """(B, N_img, encoder_width) image tokens -> (B, num_query_tokens, hidden_size).

    transformers keeps the queries in `Blip2ForConditionalGeneration` (`query_tokens`); MiniGPT-4's
    Q-Former owns them, so the whole Q-Former is one module to freeze, train, cache or save.
    """

    def __init__(self, config: Blip2QFormerConfig, num_query_tokens: int):
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"qformer.hidden_size={config.hidden_size} is not divisible by "
                             f"qformer.num_heads={config.num_attention_heads}")
        # Drawn before the layers, as this package always has: a seed gives the same random (trainable)
        # Q-Former as before transformers built it, so the embedded preset's training runs reproduce.
        queries = torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range
        super().__init__(config)
        self.query_tokens = nn.Parameter(queries)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        return super().forward(query_embeds=queries, encoder_hidden_states=image_tokens).last_hidden_state
