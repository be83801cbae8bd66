"""Tiny random models for tests and smoke runs: a LLaMA-format LLM folder with a real
SentencePiece tokenizer, built offline in a second."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

# A small corpus so the tokenizer has real merges for the words the tests and prompts use.
_CORPUS = [
    "a photo of a cat sitting on a mat",
    "the dog runs in the park with a red ball",
    "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: ",
    "a red circle on a white background",
    "Give me a detailed description of the picture.",
    "there is a blue square and a green star next to a yellow triangle",
    "Take a look at this image and describe what you notice.",
    "Could you describe the contents of this image for me?",
    "You are a helpful assistant. Answer the questions about the image.",
]


def build_tiny_llm(
    directory: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 400,
    seed: int = 0,
) -> Path:
    """Write a random LlamaForCausalLM and a SentencePiece LLaMA tokenizer to `directory`.

    The tokenizer is trained like LLaMA's (BPE, byte fallback, no normalisation, dummy prefix,
    bos 1 / eos 2 / unk 0), so the code paths are the ones Vicuna takes.
    """
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model_bytes.getvalue())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True, "model_max_length": 2048})
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


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
