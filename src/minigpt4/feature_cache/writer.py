"""Writing a cache: one pass over each dataset through the training readers, frozen features in safetensors shards.

The samples come from the same `ShardSource` / `AlignedSource` / `ConversationSource` as training, so the same
samples are kept and the same ones are skipped and counted (empty captions, undecodable images, truncated tars, ...).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from minigpt4.data import SkippedSample, summarize_skips
from minigpt4.data.aligned import AlignedSource
from minigpt4.data.conversations import ConversationSource
from minigpt4.data.pipeline import Candidate, decode, stable_seed, transform_sample
from minigpt4.data.webdataset import ShardSource
from minigpt4.feature_cache.layout import FORMAT_VERSION, MANIFEST, fingerprint, shard_name
from minigpt4.processing.image import MAX_IMAGE_BYTES, ImageTransform
from minigpt4.processing.text import process_caption

log = logging.getLogger(__name__)

KINDS = ("webdataset", "aligned", "conversations")


def dataset_samples(kind: str, path: str, index: int, *, seed: int, process_captions: bool,
                    max_image_bytes: int = MAX_IMAGE_BYTES) -> Iterator[Candidate | SkippedSample]:
    """Every sample of one training dataset once, as the training readers see it (captions processed alike).

    The dataset is opened (paths and annotation file checked) on the call; samples are read when iterated.
    """
    if kind == "webdataset":
        processor = process_caption if process_captions else None
        return ShardSource(path, index, seed=seed, shuffle_buffer=0, caption_processor=processor,
                           max_image_bytes=max_image_bytes).one_pass()
    if kind == "aligned":  # stage 2 uses raw captions, as in training
        return AlignedSource(path, seed=seed, max_image_bytes=max_image_bytes).one_pass()
    if kind == "conversations":
        return ConversationSource(path, seed=seed, max_image_bytes=max_image_bytes).one_pass()
    raise ValueError(f"dataset kind {kind!r} cannot be cached; use one of {', '.join(KINDS)}")


class _ShardWriter:
    """Collects tensors and writes them `shard_size` at a time as features-NNNNN.safetensors."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.index = 0

    def add(self, name: str, tensor: torch.Tensor) -> str:
        """Store `tensor` under `name`; returns the file name of the shard it goes to."""
        shard = shard_name(self.index)
        self.tensors[name] = tensor.clone()
        if len(self.tensors) >= self.shard_size:
            self.close()
        return shard

    def close(self) -> None:
        if self.tensors:
            save_file(self.tensors, str(self.folder / shard_name(self.index)))
            self.tensors = {}
            self.index += 1


def _clear_old_cache(folder: Path) -> None:
    """Remove an earlier cache in `folder`: the manifest first, so that a rebuild that stops half-way is never
    read as a complete cache whose shards now hold other samples; then its shards, so none is left over.

    Raises:
        ValueError: `folder` holds a manifest.json that is not a feature cache's (nothing is removed).
    """
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            ours = "fingerprint" in json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, ValueError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"{manifest} exists and is not a feature cache's manifest; "
                             "write the cache to an empty or new folder")
        manifest.unlink()
    for old in folder.glob("features-*.safetensors"):
        old.unlink()


@dataclass
class _Pending:
    item: Candidate
    views: list[torch.Tensor]  # (3, H, W) each


def _prepared(reader: Iterator[Candidate | SkippedSample], transform: ImageTransform, views: int
              ) -> Iterator[_Pending | SkippedSample]:
    """Each sample decoded and transformed `views` times (view v seeded from the sample and v), or its skip:
    the decoding and transform steps of training, with its skip reasons."""
    for item in reader:
        image = item if isinstance(item, SkippedSample) else decode(item)
        if isinstance(image, SkippedSample):
            yield image
            continue
        tensors = [transform_sample(transform, image, replace(item, seed=stable_seed("view", item.seed, v)))
                   for v in range(views)]
        yield next((t for t in tensors if isinstance(t, SkippedSample)), None) or _Pending(item, tensors)


@torch.no_grad()
def build_cache(
    model,
    sources: Sequence[tuple[str, str]],
    output: str | Path,
    transform: ImageTransform,
    views: int = 1,
    batch_size: int = 32,
    shard_size: int = 2000,
    process_captions: bool = True,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> tuple[int, list[SkippedSample]]:
    """Write the cache of `sources` [(kind, path), ...] to `output`; returns (samples, skipped).

    `views` > 1 only makes sense with a random (training) transform: view v of a sample is the transform
    seeded from (seed, dataset, sample, v), so it does not depend on batching. Every dataset is opened
    before an old cache in `output` is removed, and the manifest is written last. `progress(n)` is called
    after every batch with the number of images just done.

    Raises:
        FileNotFoundError / ValueError: a dataset path that leads to no input (as the training readers say it),
            a dataset with no usable sample at all (naming the kinds of problems found), or an `output` folder
            holding a manifest.json that is not a cache's.
    """
    if views < 1:
        raise ValueError(f"views={views}: need at least one view per image")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")

    def encode(index: int, pending: list[_Pending], records: list[dict]) -> None:
        pixels = torch.stack([view for p in pending for view in p.views])  # (B*views, 3, H, W)
        feats = model.frozen_features(pixels).to(torch.float16).cpu()  # (B*views, N, C)
        feats = feats.view(len(pending), views, *feats.shape[1:])  # (B, views, N, C)
        for row, p in enumerate(pending):
            cache_id = f"{index}/{len(records)}"  # keys may repeat across shards; the position does not
            records.append({"id": cache_id, "key": p.item.key, "source": p.item.source, "text": p.item.text,
                            "shard": writer.add(cache_id, feats[row])})
        feature_shape[:] = list(feats.shape[2:])
        if progress is not None:
            progress(len(pending))

    # Open every dataset (checking its paths and annotation file) before an old cache is touched.
    readers = [dataset_samples(kind, path, index, seed=seed, process_captions=process_captions,
                               max_image_bytes=max_image_bytes)
               for index, (kind, path) in enumerate(sources)]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _clear_old_cache(output)
    skipped: list[SkippedSample] = []
    datasets = []
    writer = _ShardWriter(output, shard_size)
    feature_shape: list[int] = []
    for index, ((kind, path), reader) in enumerate(zip(sources, readers, strict=True)):
        records: list[dict] = []
        pending: list[_Pending] = []
        dataset_skips: list[SkippedSample] = []
        for result in _prepared(reader, transform, views):
            if isinstance(result, SkippedSample):
                log.warning("skipped %s", result)
                dataset_skips.append(result)
                continue
            pending.append(result)
            if len(pending) >= batch_size:
                encode(index, pending, records)
                pending = []
        if pending:
            encode(index, pending, records)
        if not records:
            raise ValueError(f"no usable sample in {path!r} ({summarize_skips(dataset_skips)}); "
                             "run `minigpt4 data check` on it")
        skipped += dataset_skips
        datasets.append({"kind": kind, "path": str(path), "samples": records})
    writer.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(model, transform),
        "transform": repr(transform),
        "views": views,
        "feature_shape": feature_shape,
        "dtype": "float16",
        "datasets": datasets,
        "skipped": len(skipped),
    }
    partial = output / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest))
    partial.replace(output / MANIFEST)  # the manifest appears whole, after every shard is written
    return sum(len(d["samples"]) for d in datasets), skipped
