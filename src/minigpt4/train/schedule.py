"""The learning-rate schedule: linear warmup then cosine, a pure function of the optimizer step.

Being stateless means a resumed run needs nothing but its step number to continue the schedule.

The original (`linear_warmup_cosine_lr`) computes, at global step t of a run of E epochs x N steps,

    warmup (t < W):  lr = min(peak, warmup_lr + (peak - warmup_lr) * (t mod N) / W)
    afterwards:      lr = min_lr + (peak - min_lr) * (1 + cos(pi * t / (E * N))) / 2

The warmup measures steps inside the epoch and the cosine runs over the whole run, warmup included,
so the lr never reaches `peak` and drops by a step where warmup ends (stage 1: 9.998e-5 at t=4999,
9.707e-5 at t=5000). `legacy` reproduces this exactly and is the default: the configs exist to
reproduce the released runs, and the step (3 % of the lr, once) is harmless. `continuous` is the
textbook form (warmup to `peak` over W global steps, then cosine over the remaining steps) for new
recipes where a clean curve matters more than parity.
"""

from __future__ import annotations

import math

from minigpt4.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) under `cfg`."""
    total = cfg.epochs * cfg.iters_per_epoch
    if step < cfg.warmup_steps:
        position = step % cfg.iters_per_epoch if cfg.schedule == "legacy" else step
        warm = cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * position / max(cfg.warmup_steps, 1)
        return min(cfg.lr, warm)
    if cfg.schedule == "legacy":
        progress = step / total
    else:
        progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
