"""Shared fixtures: tiny random models built offline, real photos from scikit-image."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# model.dtype=auto resolves the same (fp32) on every test machine, whatever its CPU; tests of the choice set their own.
os.environ.setdefault("MINIGPT4_CPU_BF16", "0")
# Small GEMMs run faster on one thread on this 2-core machine, and results stay deterministic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A random 2-layer LLaMA with a real SentencePiece tokenizer (vocab 400)."""
    from minigpt4.testing import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture
def tiny_config(tiny_llm_dir):
    """The `tiny` model preset pointed at the tiny LLM."""
    from minigpt4.config import model_preset

    cfg = model_preset("tiny")
    cfg.llm.path = str(tiny_llm_dir)
    return cfg


@pytest.fixture
def tiny_model(tiny_config):
    from minigpt4.model.build import build_model

    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(scope="session")
def photo():
    """A real photo (Chelsea the cat, CC0) as a PIL image."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())


@pytest.fixture(scope="session")
def sideways_jpeg():
    """orientation -> a 40x20 JPEG, red on top and blue below, tagged with that EXIF orientation: as a phone
    stores a portrait photo (6: turn 90 degrees clockwise to view, 8: counter-clockwise). Upright it is 20x40."""
    import io

    from PIL import Image

    def make(orientation: int) -> bytes:
        stored = Image.new("RGB", (40, 20), (0, 0, 255))
        stored.paste((255, 0, 0), (0, 0, 40, 10))
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        stored.save(buffer, "JPEG", quality=95, exif=exif)
        return buffer.getvalue()

    return make


@pytest.fixture(scope="session")
def tiny_llama2_llm_dir(tmp_path_factory):
    """The tiny LLaMA, its vocabulary holding "$$" (the Llama-2 release's pad token) as one piece."""
    from minigpt4.testing import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llama2_llm"), extra_pieces=("$$",))


@pytest.fixture
def tiny_llama2_config(tiny_llama2_llm_dir):
    """The `tiny` preset with the Llama-2 release's connector (merge4) and pad token."""
    from minigpt4.config import model_config

    return model_config("tiny", overrides=["connector=merge4", "llm.pad_token=$$", f"llm.path={tiny_llama2_llm_dir}"])
