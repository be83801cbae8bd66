"""`minigpt4 fetch`: the sources table, the cache manifest, the Hub path (offline, pre-populated cache)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt4.hub.fetch import DownloadError, Fetcher
from minigpt4.hub.http import HttpSettings
from minigpt4.hub.sources import PRESETS, SOURCES

from .fileserver import FileServer, Served
from .hubcache import populate

ROOT = Path(__file__).resolve().parents[2]
QUIET = HttpSettings(timeout=2.0, retries=2, backoff=0.05, progress=False)
VIT, BLIP2 = os.urandom(200_000), os.urandom(50_000)
VICUNA = {"config.json": b'{"model_type": "llama"}', "tokenizer.model": os.urandom(1000),
          "model.safetensors": os.urandom(30_000)}
PROJ_7B = os.urandom(5_000)


def _md5(data: bytes) -> dict[str, str]:
    return {"x-goog-hash": "md5=" + base64.b64encode(hashlib.md5(data).digest()).decode()}


def test_sources_table_covers_every_preset_role():
    for preset, roles in PRESETS.items():
        assert set(roles) <= {"vit", "blip2", "llm", "projection"}, preset
        assert all(key in SOURCES for key in roles.values()), preset
    assert SOURCES["eva_vit_g"].url().startswith("https://storage.googleapis.com/")
    assert SOURCES["projection-13b"].url() == (
        "https://drive.usercontent.google.com/download?id=1a4zLvaiDBr-36pasffmgpvH5P7CKmpze&export=download")
    assert (SOURCES["projection-7b"].repo_type, SOURCES["projection-7b"].location) == ("space", "Vision-CAIR/minigpt4")


def test_drive_source_through_a_mirror_then_cached_by_manifest(tmp_path, monkeypatch):
    with FileServer() as server:
        server.files["/pretrained_minigpt4.pth"] = Served(PROJ_7B, drive_id="1a4z")
        monkeypatch.setenv("MINIGPT4_MIRROR", server.base)
        lines = []
        fetcher = Fetcher(tmp_path, settings=QUIET, report=lines.append)
        path = fetcher.fetch(SOURCES["projection-13b"])
        assert path == tmp_path / "weights" / "pretrained_minigpt4.pth" and path.read_bytes() == PROJ_7B
        assert [p for p, _ in server.requests] == ["/pretrained_minigpt4.pth", "/download"]
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert manifest["files"][str(path)]["sha256"] == hashlib.sha256(PROJ_7B).hexdigest()
        # A new process trusts the manifest by size and mtime: no request, no hashing.
        again = Fetcher(tmp_path, settings=QUIET)
        assert again.cached("projection-13b") == path and again.fetch(SOURCES["projection-13b"]) == path
        assert len(server.requests) == 2
    # Changed behind the manifest's back: the cheap check notices, --verify names the file.
    path.write_bytes(b"x" + PROJ_7B[1:])
    assert Fetcher(tmp_path).cached("projection-13b") is None
    with pytest.raises(DownloadError, match="pretrained_minigpt4.pth: sha256 .* differs from the one recorded"):
        Fetcher(tmp_path).fetch(SOURCES["projection-13b"], verify=True)


def test_offline_missing_file_is_one_line_with_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT4_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        Fetcher(tmp_path).fetch(SOURCES["eva_vit_g"])
    assert str(err.value) == (
        "eva_vit_g.pth is not in the cache and downloads are off (offline mode); download "
        f"{SOURCES['eva_vit_g'].location} by hand and put it at {tmp_path / 'weights' / 'eva_vit_g.pth'}")


def test_a_file_placed_by_hand_is_taken_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT4_OFFLINE", "1")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "eva_vit_g.pth").write_bytes(VIT)
    fetcher = Fetcher(tmp_path)
    assert fetcher.fetch(SOURCES["eva_vit_g"]) == tmp_path / "weights" / "eva_vit_g.pth"
    assert fetcher.manifest.files[str(tmp_path / "weights" / "eva_vit_g.pth")]["checked"] == (
        "placed by hand, sha256 recorded")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.run([sys.executable, "-m", "minigpt4.cli", *args], env=full, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.fixture
def release(tmp_path):
    """A local server with the two plain files (the ViT cut once), a Hub cache holding the rest."""
    hub = tmp_path / "hub"
    populate(hub, "Vision-CAIR/vicuna-7b", VICUNA)
    populate(hub, "Vision-CAIR/minigpt4", {"prerained_minigpt4_7b.pth": PROJ_7B}, repo_type="space")
    with FileServer() as server:
        server.files["/eva_vit_g.pth"] = Served(VIT, headers=_md5(VIT), faults=["cut"])
        server.files["/blip2_pretrained_flant5xxl.pth"] = Served(BLIP2, headers=_md5(BLIP2))
        env = {"MINIGPT4_CACHE": str(tmp_path / "cache"), "MINIGPT4_MIRROR": server.base, "HF_HUB_CACHE": str(hub),
               "HF_HUB_OFFLINE": "1", "MINIGPT4_HTTP_BACKOFF": "0.05", "MINIGPT4_HTTP_TIMEOUT": "5"}
        yield server, env, tmp_path


def test_fetch_cli_downloads_resumes_verifies_and_reads_the_hub_cache(release):
    server, env, tmp_path = release
    done = _cli(env, "fetch", "minigpt4-7b")
    assert done.returncode == 0, done.stderr
    cache = tmp_path / "cache"
    snapshot = next((tmp_path / "hub" / "models--Vision-CAIR--vicuna-7b" / "snapshots").iterdir())
    space = next((tmp_path / "hub" / "spaces--Vision-CAIR--minigpt4" / "snapshots").iterdir())
    assert done.stdout.splitlines() == [
        f"vit: {cache / 'weights' / 'eva_vit_g.pth'}", f"blip2: {cache / 'weights' / 'blip2_pretrained_flant5xxl.pth'}",
        f"llm: {snapshot}", f"projection: {space / 'prerained_minigpt4_7b.pth'}"]
    assert (cache / "weights" / "eva_vit_g.pth").read_bytes() == VIT
    cut = int(len(VIT) * server.cut_fraction)
    assert server.requests[:2] == [("/eva_vit_g.pth", None), ("/eva_vit_g.pth", f"bytes={cut}-")]
    assert "connection dropped at byte" in done.stderr and "verified eva_vit_g.pth: size 200000 bytes" in done.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["files"][str(snapshot / "model.safetensors")]["checked"] == "sha256 = the Hub's"
    assert manifest["files"][str(snapshot / "config.json")]["checked"] == "git sha1 = the Hub's"
    assert set(manifest["sources"]) == {"eva_vit_g", "blip2", "vicuna-7b", "projection-7b"}
    # Second run: complete from the manifest, no request.
    requests = len(server.requests)
    again = _cli(env, "fetch", "minigpt4-7b")
    assert again.returncode == 0 and again.stdout == done.stdout and len(server.requests) == requests
    # A blob corrupted in the Hub cache: --verify refuses it in one line, naming the file.
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(b"\0" + blob.read_bytes()[1:])
    bad = _cli(env, "fetch", "minigpt4-7b", "--verify")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {snapshot / 'model.safetensors'}: sha256 ")
    assert "differs from the Hub's" in bad.stderr


def test_fetch_cli_offline_hub_repo_missing(release):
    _, env, tmp_path = release
    done = _cli(env, "fetch", "minigpt4-13b")  # Vision-CAIR/vicuna is not in the Hub cache
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("error: vicuna-13b: Vision-CAIR/vicuna (https://huggingface.co/Vision-CAIR/vicuna) is not in "
                    "the Hugging Face cache and downloads are off (offline mode); download it by hand "
                    "(`hf download Vision-CAIR/vicuna`) or pass its path")
