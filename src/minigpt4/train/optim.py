"""AdamW over the trainable parameters, without weight decay for biases and norm weights."""

from __future__ import annotations

import logging

import torch
from torch import nn

from minigpt4.config import TrainConfig

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the parameters with requires_grad: matrices decay, vectors/scalars do not.

    A dimension test instead of the original's name tests ("bias", "ln", "bn" substrings) gives the
    same split for MiniGPT-4 (proj.weight decays, proj.bias does not) without matching names by accident.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: nothing to optimise")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW as the original configures it (betas (0.9, 0.999), eps 1e-8, weight decay 0.05 by default)."""
    groups = param_groups(model, cfg.weight_decay)
    count = sum(p.numel() for group in groups for p in group["params"])
    log.info("number of trainable parameters: %d (%d tensors with weight decay, %d without)",
             count, len(groups[0]["params"]), len(groups[1]["params"]))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
