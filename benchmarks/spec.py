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
    """The speed switches. All off (the defaults) is the baseline: our model in its plainest form."""

    sdpa: bool = False  # scaled-dot-product attention in the ViT, Q-Former and LLM (off: eager math)
    bf16: bool = False  # frozen parts stored in bf16 (model.dtype); training also under bf16 autocast
    target_logits: bool = False  # LM head only at target positions (off: full logits, as llm(...).logits)
    length_buckets: int = 1  # > 1: rows grouped by length, trailing padding not computed
    cache: bool = False  # train from the frozen-feature cache (the towers never run in the step)
    compile: bool = False  # torch.compile of the ViT, Q-Former and LLM body (training only)
    kv_cache: bool = False  # chat: reuse attention keys/values while decoding (off: recompute all)
    gen_batch: int = 1  # chat: prompts decoded together (left padding)

    def describe(self) -> str:
        on = [name for name in ("sdpa", "bf16", "target_logits", "cache", "compile", "kv_cache") if getattr(self, name)]
        if self.length_buckets > 1:
            on.append(f"buckets={self.length_buckets}")
        if self.gen_batch > 1:
            on.append(f"batch={self.gen_batch}")
        return ", ".join(on) or "none (fp32, eager, full logits)"


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
    def from_json(cls, text: str) -> "Spec":
        data: dict[str, Any] = json.loads(text)
        data["switches"] = Switches(**data.get("switches", {}))
        return cls(**data)


# Variants by name: each speed switch alone on top of the baseline, and the switches together.
# "fast" leaves SDPA out: on this CPU it was no faster than the eager math for these shapes (and its
# bf16 backward slower); "fast+sdpa" is the GPU setting.
TRAIN_VARIANTS: dict[str, Switches] = {
    "baseline": Switches(),
    "sdpa": Switches(sdpa=True),
    "bf16": Switches(bf16=True),
    "target-logits": Switches(target_logits=True),
    "buckets": Switches(length_buckets=4),
    "cache": Switches(cache=True),
    "compile": Switches(compile=True),
    "fast": Switches(bf16=True, target_logits=True, length_buckets=4),
    "fast+cache": Switches(bf16=True, target_logits=True, length_buckets=4, cache=True),
    "fast+sdpa": Switches(sdpa=True, bf16=True, target_logits=True, length_buckets=4),
    "fast+sdpa+cache": Switches(sdpa=True, bf16=True, target_logits=True, length_buckets=4, cache=True),
    "fast+compile": Switches(bf16=True, target_logits=True, length_buckets=4, compile=True),
}
CHAT_VARIANTS: dict[str, Switches] = {
    "baseline": Switches(),
    "kv-cache": Switches(kv_cache=True),
    "sdpa": Switches(sdpa=True),
    "bf16": Switches(bf16=True),
    "fast": Switches(bf16=True, kv_cache=True),
    "fast+sdpa": Switches(sdpa=True, bf16=True, kv_cache=True),
    "fast-batch4": Switches(bf16=True, kv_cache=True, gen_batch=4),
}
