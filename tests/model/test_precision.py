"""`model.dtype=auto`: the precision chosen for the device, why, and the cached CPU micro-benchmark."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from minigpt4 import precision
from minigpt4.precision import resolve_dtype


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """An x86 CPU whose /proc/cpuinfo flags the test sets (None: unreadable), with timings it sets too."""
    monkeypatch.delenv(precision.CAPABILITY_ENV, raising=False)
    monkeypatch.setenv("MINIGPT4_CACHE", str(tmp_path))
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    state = {"flags": {"avx", "avx2", "fma"}, "seconds": {torch.float32: 1.0, torch.bfloat16: 7.8}, "timed": []}
    monkeypatch.setattr(precision, "cpu_flags", lambda: state["flags"])

    def fake_time(dtype):
        state["timed"].append(dtype)
        return state["seconds"][dtype]

    monkeypatch.setattr(precision, "_time_matmul", fake_time)
    return state


def test_auto_picks_fp32_on_an_avx2_only_cpu(cpu):
    assert resolve_dtype("auto", "cpu") == (torch.float32, "auto: this CPU has no native bf16")
    assert cpu["timed"] == []  # the flags were enough: nothing measured


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_picks_bf16_on_a_cpu_with_native_bf16(cpu, flag):
    cpu["flags"] = {"avx2", "avx512f", flag}
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16, f"auto: this CPU has {flag}")


def test_the_capability_can_be_stated_by_env(cpu, monkeypatch):
    monkeypatch.setenv(precision.CAPABILITY_ENV, "1")
    assert resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    monkeypatch.setenv(precision.CAPABILITY_ENV, "0")
    assert resolve_dtype("auto", "cpu")[0] == torch.float32


def test_unknown_cpu_is_benchmarked_once_and_cached(cpu, tmp_path):
    cpu["flags"] = None
    cpu["seconds"] = {torch.float32: 1.0, torch.bfloat16: 0.5}
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16, "auto: a bf16 matmul measured 2.0x faster than fp32 "
                                                            "on this CPU")
    assert cpu["timed"] == [torch.bfloat16, torch.float32]
    cached = json.loads((tmp_path / "precision.json").read_text())
    [(key, factor)] = cached.items()
    assert precision.cpu_model() in key and torch.__version__ in key and factor == 0.5
    assert resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    assert cpu["timed"] == [torch.bfloat16, torch.float32]  # the second call read the cache


def test_unknown_cpu_where_bf16_is_slower_gets_fp32(cpu):
    cpu["flags"] = None
    assert resolve_dtype("auto", "cpu") == (torch.float32, "auto: a bf16 matmul measured 7.8x slower than fp32 "
                                                           "on this CPU")


def test_explicit_bf16_on_a_slow_cpu_warns_with_the_factor(cpu, caplog):
    with caplog.at_level(logging.WARNING, logger="minigpt4.precision"):
        assert resolve_dtype("bfloat16", "cpu") == (torch.bfloat16, "set by model.dtype")
    assert "7.8x the time of fp32" in caplog.text
    caplog.clear()
    cpu["flags"] = {"avx2", "amx_bf16"}
    with caplog.at_level(logging.WARNING, logger="minigpt4.precision"):
        resolve_dtype("bfloat16", "cpu")
        resolve_dtype("float32", "cpu")
    assert caplog.text == ""


def test_auto_on_gpus_and_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", "cuda:1") == (torch.bfloat16, "auto: this GPU supports bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda") == (torch.float16, "auto: this GPU has no bf16")
    assert resolve_dtype("auto", "mps") == (torch.float32, "auto: bf16 speed on mps is not known")
    assert resolve_dtype("float16", "cuda") == (torch.float16, "set by model.dtype")


def test_saved_folder_records_the_resolved_dtype(tiny_config, tmp_path):
    from minigpt4.model.build import build_model
    from minigpt4.model.minigpt4 import MiniGPT4

    assert tiny_config.dtype == "auto"
    model = build_model(tiny_config)
    assert model.config.dtype == "float32" and model.dtype_reason == "auto: MINIGPT4_CPU_BF16=0"
    model.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert meta["model"]["dtype"] == "float32"
    meta["model"]["dtype"] = "auto"  # a hand-written folder may say auto: it is resolved for this device
    (tmp_path / "saved" / "config.json").write_text(json.dumps(meta))
    back = MiniGPT4.from_pretrained(tmp_path / "saved")
    assert back.config.dtype == "float32" and back.vision.embeddings.class_embedding.dtype == torch.float32


def test_the_ready_line_says_which_dtype_and_why(tiny_llm_dir, capsys):
    from minigpt4.cli import main

    rc = main(["chat", "--preset", "tiny", "--max-new-tokens", "2", "Hi", f"llm.path={tiny_llm_dir}"])
    assert rc == 0
    assert "dtype float32 (auto: MINIGPT4_CPU_BF16=0))" in capsys.readouterr().err
