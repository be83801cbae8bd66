"""`model.dtype`: the one place a requested precision becomes a torch dtype for a device, with the reason why.

`auto` picks half precision only where the device runs it natively: on CUDA bf16 (fp16 on GPUs without bf16);
on a CPU bf16 when it has AVX512-BF16 or AMX (from /proc/cpuinfo), and where the flags cannot be read, when a
one-off fp32-vs-bf16 matmul benchmark says bf16 is faster. Without native bf16, torch emulates it and every
matmul is several times slower than fp32. `MINIGPT4_CPU_BF16=1` (or `0`) states the CPU's capability instead.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from minigpt4.model.llm import DTYPES

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CAPABILITY_ENV = "MINIGPT4_CPU_BF16"
_BENCH_SIZE = 1024  # a square matmul long enough (~10 ms in fp32) to time steadily; the one-off costs well under 1 s
_BENCH_REPEATS = 3


def name_of(dtype: torch.dtype) -> str:
    """The `model.dtype` value for a torch dtype."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_model() -> str:
    """The CPU's model name, for keying the benchmark cache."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_native_bf16() -> tuple[bool | None, str]:
    """(True/False when known, None when unknown; how it is known)."""
    forced = os.environ.get(CAPABILITY_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{CAPABILITY_ENV}={forced}"
    flags = cpu_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None, "unknown"  # e.g. macOS, Windows, ARM: the flags do not tell, so measure
    present = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    return bool(present), (f"this CPU has {present[0]}" if present else "this CPU has no native bf16")


def _time_matmul(dtype: torch.dtype) -> float:
    """The best of a few timings of one fixed-shape matmul in `dtype` on the CPU, in seconds."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(_BENCH_SIZE, _BENCH_SIZE, generator=generator).to(dtype)
    b = torch.randn(_BENCH_SIZE, _BENCH_SIZE, generator=generator).to(dtype)
    torch.mm(a, b)  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(_BENCH_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def bf16_slowdown(cache_dir: Path | None = None) -> float:
    """How many times slower a bf16 matmul is than fp32 on this CPU (below 1: faster), measured once per CPU
    model and torch version and kept in `$MINIGPT4_CACHE/precision.json`."""
    from minigpt4.embedded import default_cache_dir

    path = (cache_dir or default_cache_dir()) / "precision.json"
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    factor = _time_matmul(torch.bfloat16) / _time_matmul(torch.float32)
    log.info("measured bf16 vs fp32 matmul on %s: %.2fx the time", key, factor)
    cached[key] = round(factor, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached, indent=2) + "\n")
    return factor


def resolve_dtype(requested: str, device: str | torch.device) -> tuple[torch.dtype, str]:
    """The torch dtype `model.dtype=requested` means on `device`, and why (for the model-ready line).

    An explicit bfloat16 on a CPU without native bf16 is kept, with a warning giving the measured slowdown.
    """
    device = torch.device(device)
    if requested != "auto":
        if requested == "bfloat16" and device.type == "cpu":
            native, _ = _cpu_native_bf16()
            factor = None if native else bf16_slowdown()
            if factor is not None and factor > 1:
                log.warning("model.dtype=bfloat16 on a CPU without native bf16: a bf16 matmul takes %.1fx the time "
                            "of fp32 here; model.dtype=auto (or float32) is faster", factor)
        return DTYPES[requested], "set by model.dtype"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bf16"
        return torch.float16, "auto: this GPU has no bf16"
    if device.type != "cpu":
        return torch.float32, f"auto: bf16 speed on {device.type} is not known"
    native, how = _cpu_native_bf16()
    if native is not None:
        return (torch.bfloat16 if native else torch.float32), f"auto: {how}"
    factor = bf16_slowdown()
    if factor < 1:
        return torch.bfloat16, f"auto: a bf16 matmul measured {1 / factor:.1f}x faster than fp32 on this CPU"
    return torch.float32, f"auto: a bf16 matmul measured {factor:.1f}x slower than fp32 on this CPU"
