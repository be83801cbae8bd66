"""A Hugging Face Hub cache written by hand, laid out as huggingface_hub writes it, for offline tests.

`models--ORG--NAME/refs/main` holds a commit, `snapshots/COMMIT/FILE` links to `blobs/ETAG`, and the
ETag is what the Hub sends: the sha256 for LFS files (weights), the git blob sha1 for small files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".model")


def etag(name: str, data: bytes) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def populate(hub_cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Write `files` as the `main` revision of `repo_id`; returns the snapshot folder."""
    repo = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / etag(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot
