"""Device strings from configs and flags: checked once, before any model or data work starts."""

from __future__ import annotations

import torch

from minigpt4.config import ConfigError

_EXAMPLES = "cpu, cuda, cuda:1, mps, xpu:0 or npu:0"


def _setting(field: str, value: str) -> str:
    """How the user wrote it: `--device cuda` for a flag, `model.device='cuda'` for a config key."""
    return f"{field} {value}" if field.startswith("--") else f"{field}={value!r}"


def _import_backend(kind: str, setting: str) -> None:
    """Out-of-tree torch backends register their device type on import (Ascend: torch_npu)."""
    if kind == "npu":  # torch.device() itself rejects "npu" until torch_npu is imported
        try:
            import torch_npu  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"{setting} needs the torch_npu package (Ascend NPUs): pip install torch-npu") from err


def _availability(kind: str) -> tuple[bool, int] | None:
    """(available, device count) for an accelerator type, or None when torch offers no way to ask."""
    if kind == "mps":  # torch.backends.mps is the check every torch >= 1.12 has
        available = torch.backends.mps.is_available()
        return available, int(available)
    backend = getattr(torch, kind, None)
    if backend is None or not hasattr(backend, "is_available"):
        return None
    available = bool(backend.is_available())
    count = int(backend.device_count()) if available and hasattr(backend, "device_count") else int(available)
    return available, count


def check_device(value: str, field: str = "model.device") -> torch.device:
    """The torch device `value` names, if this machine has it; else a ConfigError naming `field`, `value` and a fix.

    torch accepts `cuda` or `cuda:7` on a machine without them and fails later, deep inside the
    first tensor move (or, for an unknown type, with a message that does not name the setting).
    """
    setting = _setting(field, value)
    _import_backend(value.split(":", 1)[0], setting)
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ConfigError(f"{setting} is not a torch device; use one of {_EXAMPLES}") from err
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ConfigError(f"{setting} holds shapes, not weights, so nothing can run on it; use one of {_EXAMPLES}")
    availability = _availability(device.type)
    if availability is None:
        return device  # a backend torch cannot query (e.g. a privateuse1 plug-in): its own errors apply
    available, count = availability
    if not available:
        raise ConfigError(f"{setting}, but torch finds no {device.type} device on this machine; "
                          f"use {_setting(field, 'cpu')} (or run where a {device.type} device is present)")
    if device.index is not None and device.index >= count:
        present = ", ".join(f"{device.type}:{i}" for i in range(count))
        raise ConfigError(f"{setting}, but this machine has {count} {device.type} device(s) ({present}); "
                          "use one of those")
    return device
