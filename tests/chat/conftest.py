"""Chat fixtures: a tiny MiniGPT-4 whose LLM is turned into an exact bigram model."""

from __future__ import annotations

import pytest
import torch

from minigpt4.processing.image import eval_transform


def _make_bigram(llm, successor: dict[int, int], strength: float = 50.0) -> None:
    """Make `llm` predict `successor[t]` after token t, whatever came before.

    With every attention output and MLP output projection zeroed, each layer adds nothing to the
    residual stream, so the last hidden state is the last token's embedding and the logits are
    lm_head(norm(E[t])). Rows of lm_head are then set so the chosen successor wins by a wide margin.
    """
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = llm.get_input_embeddings().weight
        head = llm.get_output_embeddings().weight
        for source, target in successor.items():
            head[target] += strength * embeddings[source] / embeddings[source].norm()


@pytest.fixture
def pixels(photo, tiny_config):
    return eval_transform(tiny_config.vision.image_size)(photo)


@pytest.fixture
def make_bigram():
    """`make_bigram(llm, {token: next_token})` turns the LLM into that bigram model, in place."""
    return _make_bigram
