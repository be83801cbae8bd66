"""What one benchmark variant is: the measurement, the model, and the speed switches.

A `Spec` travels as JSON from `benchmarks.run` to `benchmarks.worker`, which runs it in its own
process so that its peak memory is its own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Switches:
    """What a variant runs. All defaults = the original MiniGPT-4's own step on this device: its precision
    (fp32 on a CPU, fp16 weights + fp16 autocast on a GPU), eager attention, logits at every position
    (`llm(..., labels=...)`), every row padded to the batch's longest, towers run in every step."""

    dtype: str = "original"  # original (fp32 CPU / fp16 GPU, as its configs) | auto (ours) | float32 | bfloat16
    sdpa: bool = False  # scaled-dot-product attention in the ViT, Q-Former and LLM (off: eager math)
    target_logits: bool = False  # LM head only at target positions (off: full logits, as llm(...).logits)
    length_buckets: int = 1  # > 1: rows grouped by length, trailing padding not computed
    cache: bool = False  # train from the frozen-feature cache (the towers never run in the step)
    compile: bool = False  # torch.compile of the ViT, Q-Former and LLM body (training only)
    transformers: bool = False  # transformers' Blip2ForConditionalGeneration loaded from our export
    kv_cache: bool = False  # chat: reuse attention keys/values while decoding (off: recompute all)
    gen_batch: int = 1  # chat: prompts decoded together (left padding)

    def describe(self) -> str:
        on = [] if self.dtype == "original" else [f"dtype={self.dtype}"]
        if self.transformers:
            on.append("transformers Blip2ForConditionalGeneration")
        on += [name for name in ("sdpa", "target_logits", "cache", "compile", "kv_cache") if getattr(self, name)]
        if self.length_buckets > 1:
            on.append(f"buckets={self.length_buckets}")
        if self.gen_batch > 1:
            on.append(f"batch={self.gen_batch}")
        return ", ".join(on) or "the original's settings (its precision, eager, full logits)"


@dataclass
class Spec:
    """One variant of one measurement."""

    name: str
    task: str  # "train" or "chat"
    layout: str = "stage2"  # train: "stage1" (32-token captions) or "stage2" (160-token descriptions + prompt)
    dims: str = "tiny"  # "tiny" or "original" (39-block EVA-ViT-g, BERT-base Q-Former)
    llm: str = "tiny"  # "tiny", "smollm2", "vicuna7b" (random weights at Vicuna-7B dims) or a model folder
    llm_layers: int = 0  # vicuna7b with this many layers instead of 32 (CPU dry runs); 0 = all
    device: str = "cpu"
    batch: int = 2
    steps: int = 2  # measured training steps / chat repetitions
    warmup: int = 1  # untimed steps first (the first also counts FLOPs)
    new_tokens: int = 16  # chat: tokens decoded per answer
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    workdir: str = ""  # shared scratch folder (the tiny LLM is built there once)
    switches: Switches = field(default_factory=Switches)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data: dict[str, Any] = json.loads(text)
        data["switches"] = Switches(**data.get("switches", {}))
        return cls(**data)


# Variants by name. The reference of every ratio is "original": what the original MiniGPT-4 runs on the same
# device. "transformers" is transformers' own BLIP-2 class holding the same weights (our export), with its
# defaults (SDPA); trained as one would with it: forward with labels, backward into language_projection.
# "ours" is `minigpt4 train` with its defaults (model.dtype=auto, SDPA, LM head at target positions) plus
# train.length_buckets=4.
OURS = dict(dtype="auto", sdpa=True, target_logits=True, length_buckets=4)
TRAIN_VARIANTS: dict[str, Switches] = {
    "original": Switches(),
    "transformers": Switches(dtype="auto", sdpa=True, transformers=True),
    "ours": Switches(**OURS),
    "ours+cache": Switches(**OURS, cache=True),
    # single switches on top of the original's settings
    "sdpa": Switches(sdpa=True),
    "bf16": Switches(dtype="bfloat16"),
    "target-logits": Switches(target_logits=True),
    "buckets": Switches(length_buckets=4),
    "cache": Switches(cache=True),
    "ours+compile": Switches(**OURS, compile=True),
}
CHAT_VARIANTS: dict[str, Switches] = {
    "original": Switches(kv_cache=True),  # transformers' generate with its KV cache, as the original chats
    "sdpa": Switches(kv_cache=True, sdpa=True),
    "bf16": Switches(kv_cache=True, dtype="bfloat16"),
    "ours": Switches(kv_cache=True, dtype="auto", sdpa=True),
    "ours-batch4": Switches(kv_cache=True, dtype="auto", sdpa=True, gen_batch=4),
    # a curiosity, never a reference: the whole sequence recomputed for every new token
    "no-kv-cache": Switches(),
}
