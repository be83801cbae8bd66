"""minigpt4: MiniGPT-4 that loads the original weights, on any torch device."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minigpt4.config import LLMConfig, ModelConfig, QFormerConfig, VisionConfig
    from minigpt4.model.minigpt4 import MiniGPT4

__all__ = ["MiniGPT4", "ModelConfig", "VisionConfig", "QFormerConfig", "LLMConfig"]
__version__ = "0.1.0"


def _is_not_torchao_enum_notice(record: logging.LogRecord) -> bool:
    # transformers imports torchao (model.llm.quantization=int8) whenever it loads any model, and torchao 0.18
    # registers two Enums the way torch 2.14 deprecates, which torch logs to stderr on every command.
    return "is an Enum subclass and is now natively supported" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_is_not_torchao_enum_notice)

# Imported on first use, so commands that need no model (`fetch`, `--help`) do not load torch.
_LAZY = {"MiniGPT4": "minigpt4.model.minigpt4", "ModelConfig": "minigpt4.config", "VisionConfig": "minigpt4.config",
         "QFormerConfig": "minigpt4.config", "LLMConfig": "minigpt4.config"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'minigpt4' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
