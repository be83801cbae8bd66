"""Test helpers for tiny random models (the tiny LLM itself is `minigpt4.model.tiny`, which the CLI uses)."""

from __future__ import annotations

import torch

from minigpt4.model.tiny import build_tiny_llm

__all__ = ["build_tiny_llm", "make_bigram"]


def make_bigram(llm, successor: dict[int, int], strength: float = 50.0) -> None:
    """Turn a LLaMA-style `llm` into a bigram model, in place: after token t it predicts `successor[t]`.

    With every attention and MLP output projection zeroed, the layers add nothing to the residual
    stream, so the last hidden state is the last token's embedding and the logits are
    lm_head(norm(E[t])). The chosen successors' lm_head rows then win by a wide margin. Tests use
    this to get exact, readable answers (and stop strings at known steps) from a tiny model.
    """
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = llm.get_input_embeddings().weight
        head = llm.get_output_embeddings().weight
        for source, target in successor.items():
            head[target] += strength * embeddings[source] / embeddings[source].norm()
