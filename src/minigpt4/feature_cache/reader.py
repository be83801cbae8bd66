"""Opening a cache: check its manifest against this run's frozen weights and transform, then read features."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from minigpt4.feature_cache.layout import FORMAT_VERSION, MANIFEST, StaleCacheError, fingerprint
from minigpt4.processing.image import ImageTransform


@dataclass
class CachedSample:
    cache_id: str  # tensor name in the shard: "{dataset index}/{position}"
    key: str
    text: str
    shard: str


class FeatureCache:
    """A cache folder opened for reading; given a model and transform, checked to match them first (`verify`)."""

    def __init__(self, path: str | Path, model=None, transform: ImageTransform | None = None):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"data.feature_cache={str(path)!r} has no {MANIFEST}; build it with `minigpt4 cache-features`"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            version = self.manifest.get("format_version")
            raise StaleCacheError(f"{manifest_path}: unsupported format_version {version!r}; "
                                  "rebuild it with `minigpt4 cache-features`")
        self.views: int = self.manifest["views"]
        self.datasets: list[list[CachedSample]] = [
            [CachedSample(s["id"], s["key"], s["text"], s["shard"]) for s in d["samples"]]
            for d in self.manifest["datasets"]
        ]
        self._handles: dict[str, object] = {}
        if model is not None and transform is not None:
            self.verify(model, transform)

    def verify(self, model, transform: ImageTransform) -> None:
        """Raise StaleCacheError unless the cache was made with `model`'s frozen weights and `transform`."""
        expected = fingerprint(model, transform)
        if self.manifest["fingerprint"] != expected:
            raise StaleCacheError(
                f"the feature cache {self.path} was made with other frozen weights or another image transform "
                "(or by an earlier minigpt4, whose tower weights had other names) "
                f"(cache {self.manifest['fingerprint']}, this run {expected}; cache transform "
                f"{self.manifest['transform']}). Rebuild it with `minigpt4 cache-features`, "
                "or unset data.feature_cache."
            )

    def features(self, sample: CachedSample, view: int) -> torch.Tensor:
        """(N, C) fp16 features of one view of one sample (memory-mapped read)."""
        handle = self._handles.get(sample.shard)
        if handle is None:
            handle = self._handles[sample.shard] = safe_open(str(self.path / sample.shard), framework="pt")
        return handle.get_slice(sample.cache_id)[view]
