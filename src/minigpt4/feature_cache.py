"""The frozen-feature cache: compute `model.frozen_features(pixels)` once per image, train from it.

Everything before the first trainable module is frozen, so its output depends only on the image,
the frozen weights and the image transform. Caching it removes the vision tower (and, in the
released layout, the Q-Former) from every training step.

Layout of a cache folder:
    manifest.json                  fingerprint, views, feature shape, every sample's key and text
    features-00000.safetensors     one fp16 tensor (views, N, C) per sample, named by its cache id

The fingerprint hashes the frozen weights, the transform and the dtype. A cache made with other
weights or another transform is refused (`StaleCacheError`) instead of silently training on stale
features. With a random training transform, `views` augmented views are stored per image and one is
drawn per sample per pass, as a stand-in for fresh augmentation every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minigpt4.data import SkippedSample
from minigpt4.processing.image import ImageError, ImageTransform, eval_transform, load_image, train_transform
from minigpt4.processing.text import process_caption

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StaleCacheError(ValueError):
    """The cache was made with other frozen weights or another transform than the current run's."""


def data_transform(cfg) -> ImageTransform:
    """The image transform a training job (`TrainJobConfig`) applies: random crops iff data.augment."""
    size = cfg.model.vision.image_size
    return train_transform(size) if cfg.data.augment else eval_transform(size)


def fingerprint(model, transform: ImageTransform) -> str:
    """A hash of everything `model.frozen_features` depends on: frozen weights, transform, dtype."""
    digest = hashlib.blake2b(digest_size=16)
    modules = {"vision": model.vision, "ln_vision": model.ln_vision}
    if not model.config.qformer.trainable:
        modules["qformer"] = model.qformer
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(transform).encode())
    return digest.hexdigest()


@dataclass
class CachedSample:
    cache_id: str  # tensor name in the shard: "{dataset index}/{key}"
    key: str
    text: str
    shard: str


def iterate_source(kind: str, path: str, process_captions: bool) -> Iterator[tuple[str, object, str] | SkippedSample]:
    """One pass, in order, over a dataset: (key, image bytes or path, text) or a SkippedSample."""
    if kind == "aligned":
        root = Path(path)
        annotations = json.loads((root / "filter_cap.json").read_text())["annotations"]
        for ann in annotations:
            key = str(ann.get("image_id", ""))
            caption = ann.get("caption")
            if not key or not isinstance(caption, str):
                yield SkippedSample(str(root / "filter_cap.json"), key, "annotation without image_id or caption")
                continue
            yield key, root / "image" / f"{key}.jpg", caption
        return
    import braceexpand
    import webdataset as wds

    for shard in braceexpand.braceexpand(path):
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            key = sample.get("__key__", "")
            image = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
            caption = None
            if "json" in sample:
                try:
                    caption = json.loads(sample["json"]).get("caption")
                except ValueError:
                    caption = None
            if caption is None and "txt" in sample:
                caption = sample["txt"].decode("utf-8", "replace")
            if image is None or not isinstance(caption, str):
                yield SkippedSample(shard, key, "no image or no caption")
                continue
            yield key, image, process_caption(caption) if process_captions else caption


class _ShardWriter:
    """Collects tensors and writes them `shard_size` at a time as features-NNNNN.safetensors."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.index = 0

    def add(self, name: str, tensor: torch.Tensor) -> str:
        """Store `tensor` under `name`; returns the file name of the shard it goes to."""
        shard = f"features-{self.index:05d}.safetensors"
        self.tensors[name] = tensor.clone()
        if len(self.tensors) >= self.shard_size:
            self.close()
        return shard

    def close(self) -> None:
        if self.tensors:
            save_file(self.tensors, str(self.folder / f"features-{self.index:05d}.safetensors"))
            self.tensors = {}
            self.index += 1


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
) -> tuple[int, list[SkippedSample]]:
    """Write the cache of `sources` [(kind, path), ...] to `output`; returns (samples, skipped).

    `views` > 1 only makes sense with a random (training) transform: each view is a new draw.
    `progress(n)` is called after every batch with the number of images just done.
    """
    if views < 1:
        raise ValueError(f"views={views}: need at least one view per image")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the random crops of a training transform come from torch's RNG
    skipped: list[SkippedSample] = []
    datasets = []
    writer = _ShardWriter(output, shard_size)
    feature_shape: list[int] = []

    def encode(index: int, pending: list[tuple[str, torch.Tensor, str]], records: list[dict]) -> None:
        pixels = torch.stack([p for _, p, _ in pending])  # (B*views, 3, H, W)
        feats = model.frozen_features(pixels).to(torch.float16).cpu()  # (B*views, N, C)
        feats = feats.view(len(pending) // views, views, *feats.shape[1:])  # (B, views, N, C)
        for row, (key, _, text) in enumerate(pending[::views]):
            cache_id = f"{index}/{key}"
            records.append({"id": cache_id, "key": key, "text": text, "shard": writer.add(cache_id, feats[row])})
        feature_shape[:] = list(feats.shape[2:])
        if progress is not None:
            progress(len(pending) // views)

    for index, (kind, path) in enumerate(sources):
        records: list[dict] = []
        pending: list[tuple[str, torch.Tensor, str]] = []
        for item in iterate_source(kind, path, process_captions if kind == "webdataset" else False):
            if isinstance(item, SkippedSample):
                skipped.append(item)
                continue
            key, source, text = item
            try:
                image = load_image(source, name=f"{path}:{key}")
            except (ImageError, FileNotFoundError) as err:
                skipped.append(SkippedSample(str(path), key, str(err)))
                continue
            pending += [(key, transform(image), text) for _ in range(views)]
            if len(pending) >= batch_size * views:
                encode(index, pending, records)
                pending = []
        if pending:
            encode(index, pending, records)
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
    (output / MANIFEST).write_text(json.dumps(manifest))
    for item in skipped:
        log.warning("skipped %s %s: %s", item.source, item.key, item.reason)
    return sum(len(d["samples"]) for d in datasets), skipped


class FeatureCache:
    """A cache folder opened for reading, after checking it matches the current model and transform."""

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
            raise StaleCacheError(f"{manifest_path}: unsupported format_version {version!r}")
        if model is not None and transform is not None:
            expected = fingerprint(model, transform)
            if self.manifest["fingerprint"] != expected:
                raise StaleCacheError(
                    f"the feature cache {self.path} was made with other frozen weights or another image transform "
                    f"(cache {self.manifest['fingerprint']}, this run {expected}; cache transform "
                    f"{self.manifest['transform']}). Rebuild it with `minigpt4 cache-features`, "
                    "or unset data.feature_cache."
                )
        self.views: int = self.manifest["views"]
        self.datasets: list[list[CachedSample]] = [
            [CachedSample(s["id"], s["key"], s["text"], s["shard"]) for s in d["samples"]]
            for d in self.manifest["datasets"]
        ]
        self._handles: dict[str, object] = {}

    def features(self, sample: CachedSample, view: int) -> torch.Tensor:
        """(N, C) fp16 features of one view of one sample (memory-mapped read)."""
        handle = self._handles.get(sample.shard)
        if handle is None:
            handle = self._handles[sample.shard] = safe_open(str(self.path / sample.shard), framework="pt")
        return handle.get_slice(sample.cache_id)[view]


def feature_batches(
    cache: FeatureCache,
    batch_size: int,
    *,
    seed: int,
    ratios: Sequence[float] | None = None,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> Iterator[dict]:
    """Infinite batches {"features" (B, N, C) fp32, "text", "key", "skipped", "dataset"} from a cache.

    Each batch comes whole from one dataset picked by `ratios` with a seeded RNG; each dataset is
    reshuffled every pass (seed + pass) and split across ranks without duplicates; every sample
    gets one of its stored views at random per pass. Deterministic: `start_batch=n` yields what the
    same call without it yields from batch n on.
    """
    datasets = cache.datasets
    ratios = list(ratios) if ratios is not None else [1.0] * len(datasets)
    if len(ratios) != len(datasets):
        raise ValueError(f"{len(ratios)} ratios for {len(datasets)} cached datasets")
    for index, samples in enumerate(datasets):
        if len(samples) // world_size < batch_size:
            raise ValueError(
                f"cached dataset {index} has {len(samples)} samples: too few for "
                f"batch_size={batch_size} x {world_size} processes"
            )

    def epochs(index: int) -> Iterator[tuple[int, int]]:
        """(sample index, view) forever, reshuffled per pass, this rank's share only."""
        samples = datasets[index]
        epoch = 0
        while True:
            rng = random.Random(f"{seed}:{index}:{epoch}")
            order = list(range(len(samples)))
            rng.shuffle(order)
            usable = len(order) // (world_size * batch_size) * world_size * batch_size  # drop_last
            for i in order[rank:usable:world_size]:
                yield i, rng.randrange(cache.views)
            epoch += 1

    streams = [epochs(i) for i in range(len(datasets))]
    picker = random.Random(f"{seed}:pick")
    produced = 0
    while True:
        index = picker.choices(range(len(datasets)), weights=ratios)[0]
        chosen = [next(streams[index]) for _ in range(batch_size)]
        if produced >= start_batch:
            samples = [datasets[index][i] for i, _ in chosen]
            feats = torch.stack([cache.features(s, view) for s, (_, view) in zip(samples, chosen, strict=True)]).float()
            yield {"features": feats, "text": [s.text for s in samples], "key": [s.key for s in samples],
                   "skipped": [], "dataset": cache.manifest["datasets"][index]["path"]}
        produced += 1


def cached_batches(cfg, model, *, rank: int = 0, world_size: int = 1, start_batch: int = 0) -> Iterator[dict]:
    """Training batches from `cfg.data.feature_cache` for a `TrainJobConfig` and its built model.

    Refuses a cache made with other frozen weights or another transform (`StaleCacheError`) and
    one whose datasets differ from `cfg.data.datasets`.
    """
    cache = FeatureCache(cfg.data.feature_cache, model, data_transform(cfg))
    cached = [(d["kind"], d["path"]) for d in cache.manifest["datasets"]]
    wanted = [(d.kind, d.path) for d in cfg.data.datasets]
    if cached != wanted:
        raise StaleCacheError(
            f"data.feature_cache={cfg.data.feature_cache!r} holds the datasets {cached}, "
            f"but data.datasets is {wanted}; "
            "rebuild the cache with `minigpt4 cache-features` for this config"
        )
    return feature_batches(
        cache,
        cfg.data.batch_size,
        seed=cfg.train.seed,
        ratios=[d.ratio for d in cfg.data.datasets],
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
    )
