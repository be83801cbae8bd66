"""Training data: stage-1 webdataset shards, the stage-2 `cc_sbu_align` folder and the stage-2 prompts.

Both stages yield batches as dicts:
    {"image": (B, 3, H, W) float, "text": list[str], "key": list[str],
     "skipped": list[SkippedSample], "dataset": str}
where "skipped" lists the bad samples met since the previous batch from the same stream, so the
training loop can count them even when they were found inside DataLoader worker processes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class SkippedSample:
    """A sample (or a whole shard part) that was left out, and why."""

    source: str  # shard path, annotation file or image file
    key: str  # sample key inside the source ("" when the problem is not tied to one sample)
    reason: str

    def __str__(self) -> str:
        where = f"{self.source} [{self.key}]" if self.key else self.source
        return f"{where}: {self.reason}"


class NoUsableData(RuntimeError):
    """A whole pass over a reader's share of the data gave no usable sample: training on it would spin forever."""


def summarize_skips(skips: list[SkippedSample]) -> str:
    """One line for the end-of-run report: the total and the count per kind of problem."""
    if not skips:
        return "skipped 0 samples"
    # The reason's first words name the kind of problem; the rest is detail (file, offset, decoder message).
    kinds = Counter(skip.reason.split(":")[0] for skip in skips)
    detail = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    return f"skipped {len(skips)} samples ({detail})"


__all__ = ["NoUsableData", "SkippedSample", "summarize_skips"]
