"""The default model of chat/caption/demo/serve, and released presets filled from the cache on first use."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from minigpt4.cli import main
from minigpt4.commands import CommandError
from minigpt4.commands.model_options import NO_MODEL, choose_default_model, model_config_from_args
from minigpt4.hub.fetch import Fetcher
from minigpt4.hub.sources import SOURCES

from .fileserver import FileServer, Served
from .hubcache import populate


@pytest.fixture
def empty(tmp_path, monkeypatch):
    """An empty cache, an empty working folder, downloads off."""
    monkeypatch.setenv("MINIGPT4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINIGPT4_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _args(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"preset": None, "checkpoint": None, "config": None, "no_fetch": False, **given})


def _released_7b(tmp_path: Path, monkeypatch) -> None:
    """minigpt4-7b's four parts: two files placed by hand, two in a Hugging Face cache; recorded by a fetch."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    populate(hub, "Vision-CAIR/vicuna-7b", {"config.json": b"{}", "model.safetensors": b"\1" * 64})
    populate(hub, "Vision-CAIR/minigpt4", {"prerained_minigpt4_7b.pth": b"\2" * 64}, repo_type="space")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    weights = tmp_path / "cache" / "weights"
    weights.mkdir(parents=True)
    for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"):
        (weights / name).write_bytes(b"\3" * 64)
    Fetcher(offline=True).fetch_preset("minigpt4-7b")


def test_empty_cache_no_quickstart_is_one_line_listing_the_three_ways(empty, capsys):
    (empty / "photo.jpg").write_bytes(b"")  # never read: the model is chosen first
    code = main(["chat", "--image", "photo.jpg", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {NO_MODEL}"]
    for way in ("minigpt4 fetch minigpt4-7b", "minigpt4 quickstart", "--checkpoint DIR"):
        assert way in NO_MODEL


def test_quickstart_model_is_the_fallback_and_said_on_stderr(empty, capsys):
    (empty / "quickstart" / "model").mkdir(parents=True)
    args = _args()
    choose_default_model(args)
    assert args.checkpoint == Path("quickstart/model") and args.preset is None
    assert capsys.readouterr().err == (
        "no model given: using ./quickstart/model (the model `minigpt4 quickstart` trained)\n")


def test_complete_7b_in_the_cache_comes_before_quickstart(empty, monkeypatch, capsys):
    (empty / "quickstart" / "model").mkdir(parents=True)
    _released_7b(empty, monkeypatch)
    args = _args()
    choose_default_model(args)
    assert args.preset == "minigpt4-7b" and args.checkpoint is None
    assert "using minigpt4-7b from the cache" in capsys.readouterr().err
    cfg = model_config_from_args(args, [])
    assert cfg.weights.vit == str(empty / "cache" / "weights" / "eva_vit_g.pth")
    assert cfg.llm.path.endswith("snapshots/" + Path(cfg.llm.path).name) and "vicuna-7b" in cfg.llm.path
    assert cfg.weights.projection.endswith("prerained_minigpt4_7b.pth")


def test_an_incomplete_cache_does_not_count(empty, monkeypatch):
    _released_7b(empty, monkeypatch)
    (empty / "cache" / "weights" / "eva_vit_g.pth").write_bytes(b"changed")
    with pytest.raises(CommandError, match="no model given and none found"):
        choose_default_model(_args())


def test_given_options_win(empty, monkeypatch):
    _released_7b(empty, monkeypatch)
    args = _args(checkpoint=Path("mine"))
    choose_default_model(args)
    assert args.checkpoint == Path("mine") and args.preset is None
    args = _args(preset="tiny")
    choose_default_model(args)
    assert args.preset == "tiny"


def test_no_fetch_with_a_missing_file_is_one_line(empty, capsys):
    (empty / "photo.jpg").write_bytes(b"")
    code = main(["chat", "--preset", "minigpt4-7b", "--no-fetch", "--image", "photo.jpg", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"error: eva_vit_g.pth is not in the cache and downloads are off (offline mode); download "
                      f"{SOURCES['eva_vit_g'].location} by hand and put it at "
                      f"{empty / 'cache' / 'weights' / 'eva_vit_g.pth'}")


def test_first_use_says_what_and_how_many_gb_then_fetches(empty, monkeypatch, capsys):
    monkeypatch.delenv("MINIGPT4_OFFLINE")
    _released_7b(empty, monkeypatch)
    for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"):
        (empty / "cache" / "weights" / name).unlink()
    with FileServer() as server:
        for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"):
            server.files["/" + name] = Served(os.urandom(1000))
        monkeypatch.setenv("MINIGPT4_MIRROR", server.base)
        cfg = model_config_from_args(_args(preset="minigpt4-7b", config=None), ["weights.blip2=/mine/blip2.pth"])
    err = capsys.readouterr().err
    assert ("minigpt4-7b: first use, fetching 1 file(s), ~2.0 GB: eva_vit_g.pth (~2.0 GB) into "
            f"{empty / 'cache'}") in err
    assert [path for path, _ in server.requests] == ["/eva_vit_g.pth"]  # blip2 was given, so not fetched
    assert cfg.weights.vit == str(empty / "cache" / "weights" / "eva_vit_g.pth")
    assert cfg.weights.blip2 == "/mine/blip2.pth"


def test_train_fills_frozen_parts_from_the_cache_but_never_the_projection(empty, monkeypatch, capsys):
    from minigpt4.commands.model_options import fill_released_files
    from minigpt4.config import train_config

    job = empty / "job.yaml"
    job.write_text("preset: minigpt4-7b\n")
    assert main(["train", str(job)]) == 2  # offline, empty cache: one line naming the first file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: eva_vit_g.pth is not in the cache and downloads are off")
    _released_7b(empty, monkeypatch)
    cfg = train_config(job, [])
    fill_released_files(cfg.model, cfg.preset, no_fetch=True, roles=("vit", "blip2", "llm"))
    assert cfg.model.weights.vit.endswith("eva_vit_g.pth") and "vicuna-7b" in cfg.model.llm.path
    assert cfg.model.weights.projection == ""  # trained, not taken from the release


def test_llama2_preset_fills_its_three_parts_and_names_the_gated_repo(empty, capsys):
    (empty / "cache" / "weights").mkdir(parents=True)
    (empty / "cache" / "weights" / "eva_vit_g.pth").write_bytes(b"\3" * 64)
    (empty / "photo.jpg").write_bytes(b"")
    assert main(["chat", "--preset", "minigpt4-llama2-7b", "--image", "photo.jpg", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Llama-2-7b-chat-hf: meta-llama/Llama-2-7b-chat-hf (https://huggingface.co/")
    assert err[-1].endswith("(gated: accept the licence on its Hub page and log in (HF_TOKEN))")
