"""This machine's own matmul peak, the denominator of model FLOP utilisation."""

from __future__ import annotations

import time

import torch

# The ViT-g MLP matmul of two images (2 x 257 tokens, 1408 -> 6144): the shape that dominates the
# original vision tower. On a GPU a large square matmul is the fairer peak.
CPU_SHAPE = (514, 1408, 6144)
GPU_SHAPE = (8192, 8192, 8192)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", repeats: int = 20) -> float:
    """Best-of-`repeats` FLOP/s of an (M, K) @ (K, N) matmul in `dtype` on `device`.

    The best, not the mean: on a shared machine other processes only ever slow a run down.
    """
    dev = torch.device(device)
    m, k, n = GPU_SHAPE if dev.type == "cuda" else CPU_SHAPE
    a = torch.randn(m, k, device=dev).to(dtype)
    b = torch.randn(k, n, device=dev).to(dtype)
    out = torch.empty(m, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call sets up the kernel
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best
