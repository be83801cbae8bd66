"""Caption processing and token-for-token agreement of the LLaMA tokenizer with sentencepiece."""

from __future__ import annotations

import random

import sentencepiece as spm

from minigpt4.model.llm import load_tokenizer
from minigpt4.processing.text import process_caption


def test_caption_processor_matches_blip_caption():
    assert process_caption("A Dog, running!  (fast)\n") == "a dog, running fast"
    assert process_caption('He said: "hi"; ok~ #tag *star*') == "he said hi ok tag star"
    assert process_caption("it's a well-known road/path?") == "it's a well-known road/path?"
    assert process_caption(" ".join(["word"] * 60)) == " ".join(["word"] * 50)


def test_llama_tokenizer_agrees_with_sentencepiece(tiny_llm_dir):
    """transformers 5 drops SentencePiece's dummy prefix before a leading space; load_tokenizer restores it."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_llm_dir / "tokenizer.model"))
    tok = load_tokenizer(tiny_llm_dir)
    rng = random.Random(0)
    alphabet = list("abcdefghij ###<>/\n.,!?ÜéX") + [" "] * 4
    samples = [" Describe this image", "  two spaces", "###Human: <Img>", "</Img> Describe it ###Assistant: ",
               "a cat\n", "end  ", "\nfirst"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(1500)]
    mismatches = [s for s in samples if tok(s, add_special_tokens=False).input_ids != sp.encode(s)]
    assert mismatches == []
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"
