"""Chat fixtures."""

from __future__ import annotations

import pytest

from minigpt4.processing.image import eval_transform


@pytest.fixture
def pixels(photo, tiny_config):
    """The cat photo as the tiny model's (3, H, W) input."""
    return eval_transform(tiny_config.vision.image_size)(photo)
