"""minigpt4: MiniGPT-4 that loads the original weights, on any torch device."""

from minigpt4.config import ModelConfig, QFormerConfig, VisionConfig, LLMConfig
from minigpt4.model.minigpt4 import MiniGPT4

__all__ = ["MiniGPT4", "ModelConfig", "VisionConfig", "QFormerConfig", "LLMConfig"]
__version__ = "0.1.0"
