"""The LLM split by accelerate (model.llm.device_map / max_memory / offload_folder): CPU + disk offload of the
tiny LLM with a max_memory below its size gives the same greedy tokens as the plain load."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt4.chat import Chat
from minigpt4.cli import main
from minigpt4.config import ConfigError, model_config
from minigpt4.convert import CheckpointError
from minigpt4.model.build import build_model
from minigpt4.processing.image import eval_transform

SRC = Path(__file__).resolve().parents[2] / "src"
CPU_LIMIT = "400KiB"  # the tiny LLM's weights are ~530 KB, so part of it must go to disk
QUESTION = "What is in this picture?"


def _offload(tmp_path: Path) -> list[str]:
    return ["llm.device_map=auto", f"llm.max_memory=cpu={CPU_LIMIT}", f"llm.offload_folder={tmp_path / 'offload'}"]


def _answer(model, photo, max_new_tokens: int = 8) -> str:
    chat = Chat(model, eval_transform(model.config.vision.image_size))
    chat.upload(photo.copy())
    chat.ask(QUESTION)
    return chat.answer(do_sample=False, max_new_tokens=max_new_tokens)


def _resident_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if not t.is_meta)


def test_offloaded_llm_gives_the_same_tokens(tiny_llm_dir, tiny_model, photo, tmp_path):
    torch.manual_seed(0)  # the same random towers as tiny_model
    offloaded = build_model(model_config("tiny", overrides=[f"llm.path={tiny_llm_dir}", *_offload(tmp_path)]))
    placement = set(offloaded.llm.hf_device_map.values())
    assert "disk" in placement, offloaded.llm.hf_device_map
    model_bytes = _resident_bytes(tiny_model.llm)
    assert model_bytes > 400 * 1024  # the limit really is below the model
    assert _resident_bytes(offloaded.llm) <= 400 * 1024
    assert any(p.is_meta for p in offloaded.llm.parameters())  # offloaded weights live outside the model
    assert offloaded.device == tiny_model.device
    plain_answer = _answer(tiny_model, photo)
    assert plain_answer and _answer(offloaded, photo) == plain_answer


def test_offloaded_weights_are_still_checked_for_nan(tiny_llm_dir, tmp_path):
    broken = tmp_path / "llm"
    shutil.copytree(tiny_llm_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["lm_head.weight"][3, 5] = float("nan")  # the last module, which the limit sends to disk
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight .* holds NaN"):
        build_model(model_config("tiny", overrides=[f"llm.path={broken}", *_offload(tmp_path)]))


@pytest.mark.parametrize("overrides, message", [
    (["llm.device_map=auto", "llm.max_memory=cpu=lots"], "model.llm.max_memory='cpu=lots': 'lots' is not a size"),
    (["llm.device_map=auto", "llm.max_memory=gpu0=1GiB"], "model.llm.max_memory='gpu0=1GiB': 'gpu0=1GiB' is not"),
    (["llm.max_memory=cpu=1GiB"], "model.llm.max_memory is set but model.llm.device_map is not"),
    (["llm.device_map=everywhere"], "llm.device_map: 'everywhere' is not one of"),
])
def test_bad_placement_is_one_clear_error(tiny_llm_dir, photo, tmp_path, capsys, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        model_config("tiny", overrides=overrides)
    image = tmp_path / "cat.jpg"
    photo.save(image)
    assert main(["chat", "--preset", "tiny", "--image", str(image), "hi", f"llm.path={tiny_llm_dir}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_chat_cli_with_offload_overrides_gives_the_same_answer(tiny_llm_dir, tiny_model, photo, tmp_path):
    image = tmp_path / "cat.jpg"
    photo.save(image)
    from PIL import Image

    expected = _answer(tiny_model, Image.open(image), max_new_tokens=6)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MINIGPT4_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "minigpt4.cli", "chat", "--preset", "tiny", "--image", str(image), "--greedy",
         "--max-new-tokens", "6", "--no-stream", QUESTION, f"llm.path={tiny_llm_dir}", *_offload(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n").splitlines()[-1] == expected


def test_a_saved_folder_loads_offloaded_and_records_no_placement(tiny_llm_dir, tiny_model, photo, tmp_path):
    torch.manual_seed(0)
    offloaded = build_model(model_config("tiny", overrides=[f"llm.path={tiny_llm_dir}", *_offload(tmp_path)]))
    offloaded.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["model"]["llm"]
    assert (saved["device_map"], saved["max_memory"], saved["offload_folder"]) == ("", "", "")
    reloaded = build_model(model_config("tiny", overrides=[f"weights.pretrained={tmp_path / 'model'}",
                                                           *_offload(tmp_path)]))
    assert "disk" in set(reloaded.llm.hf_device_map.values())
    assert _answer(reloaded, photo) == _answer(tiny_model, photo)
