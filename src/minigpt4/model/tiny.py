"""The `tiny` preset's LLM: a random 2-layer LLaMA with a real SentencePiece tokenizer, built offline in a second.

The tiny preset is a plumbing demo (and the tests' model): every part runs, nothing is downloaded,
and the answers are noise. The folder carries a marker file, so whatever loads it can say that its
weights are random (`is_random_llm`).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import torch

from minigpt4.embedded import default_cache_dir

RANDOM_MARKER = "minigpt4-random-weights.txt"
# Bump when the folder build_tiny_llm writes changes, so cached copies are rebuilt rather than trusted.
TINY_LLM_VERSION = "1"

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
    extra_pieces: tuple[str, ...] = (),
) -> Path:
    """Write a random LlamaForCausalLM and a SentencePiece LLaMA tokenizer to `directory`.

    The tokenizer is trained like LLaMA's (BPE, byte fallback, no normalisation, dummy prefix,
    bos 1 / eos 2 / unk 0), so the code paths are the ones Vicuna takes. `extra_pieces` become single
    pieces of its vocabulary (e.g. "$$", which Llama-2's vocabulary has and the Llama-2 release pads with).
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
        user_defined_symbols=list(extra_pieces),
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
    (directory / RANDOM_MARKER).write_text(
        f"version={TINY_LLM_VERSION}\nThese weights are random (minigpt4's tiny preset): a plumbing demo.\n"
    )
    return directory


def prepare_tiny_llm(directory: str | Path | None = None) -> Path:
    """The tiny preset's LLM folder (default `default_cache_dir()/tiny-llm`), built on first use."""
    target = Path(directory).expanduser() if directory else default_cache_dir() / "tiny-llm"
    marker = target / RANDOM_MARKER
    if marker.is_file() and marker.read_text().startswith(f"version={TINY_LLM_VERSION}\n"):
        return target
    # Build next to the target, then rename, so a concurrent or interrupted build never looks finished.
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".partial", dir=target.parent))
    build_tiny_llm(partial)
    shutil.rmtree(target, ignore_errors=True)
    try:
        partial.rename(target)
    except OSError:  # another process finished first; its folder is the same
        shutil.rmtree(partial, ignore_errors=True)
    return target


def is_random_llm(directory: str | Path) -> bool:
    """Whether an LLM folder was made by `build_tiny_llm` (random weights)."""
    return (Path(directory).expanduser() / RANDOM_MARKER).is_file()
