"""This machine's own matmul peak, the denominator of model FLOP utilisation."""

from __future__ import annotations

import time

import torch

# The ViT-g MLP matmul of two images (2 x 257 tokens, 1408 -> 6144): the shape that dominates the
# original vision tower, and a square one (some BLAS reach their best on it). On a GPU a large square
# matmul is the fairer peak.
CPU_SHAPES = ((514, 1408, 6144), (2048, 2048, 2048))
GPU_SHAPES = ((8192, 8192, 8192),)


def uses_cpu_clock(device: str | torch.device) -> bool:
    """Time by the process's CPU time: on a CPU with one torch thread, where it is the compute time itself.

    On a shared machine the wall time also counts the slices the scheduler gave to other processes
    (several-fold on a loaded 2-core box); one thread's CPU time does not. Elsewhere: the wall clock.
    """
    return torch.device(device).type == "cpu" and torch.get_num_threads() == 1


def clock(device: str | torch.device):
    """`time.process_time` where `uses_cpu_clock`, else `time.perf_counter`."""
    return time.process_time if uses_cpu_clock(device) else time.perf_counter


def matmul_peak(dtype: torch.dtype, device: str = "cpu", repeats: int = 10) -> float:
    """The best FLOP/s of `repeats` (M, K) @ (K, N) matmuls in `dtype` on `device`, over a few shapes.

    The best, not the mean: on a shared machine other processes only ever slow a run down. Timed by
    `clock(device)`, the same clock the benchmark steps use.
    """
    dev = torch.device(device)
    return max(_best(shape, dtype, dev, repeats) for shape in (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES))


def _best(shape: tuple[int, int, int], dtype: torch.dtype, dev: torch.device, repeats: int) -> float:
    m, k, n = shape
    now = clock(dev)
    a = torch.randn(m, k, device=dev).to(dtype)
    b = torch.randn(k, n, device=dev).to(dtype)
    out = torch.empty(m, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call sets up the kernel
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = now()
        torch.mm(a, b, out=out)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, now() - start)
    return 2 * m * k * n / best
