"""Training batches from an opened cache: datasets mixed by ratio, reshuffled per pass, split over ranks."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from minigpt4.config import ConfigError, TrainJobConfig
from minigpt4.feature_cache.layout import StaleCacheError, data_transform
from minigpt4.feature_cache.reader import FeatureCache


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
    gets one of its stored views per pass, drawn from (seed, dataset, pass, sample), so the
    ranks together see what one process with their whole batch sees. Deterministic: `start_batch=n`
    yields what the same call without it yields from batch n on.
    """
    datasets = cache.datasets
    ratios = list(ratios) if ratios is not None else [1.0] * len(datasets)
    if len(ratios) != len(datasets):
        raise ValueError(f"{len(ratios)} ratios for {len(datasets)} cached datasets")
    for index, samples in enumerate(datasets):
        if len(samples) // world_size < batch_size:
            raise ConfigError(
                f"the cached dataset {cache.manifest['datasets'][index]['path']!r} has {len(samples)} samples: "
                f"too few for data.batch_size={batch_size} on {world_size} process(es); lower data.batch_size"
            )

    def epochs(index: int) -> Iterator[tuple[int, int]]:
        """(sample index, view) forever, reshuffled per pass, this rank's share only."""
        samples = datasets[index]
        epoch = 0
        while True:
            order = list(range(len(samples)))
            random.Random(f"{seed}:{index}:{epoch}").shuffle(order)
            usable = len(order) // (world_size * batch_size) * world_size * batch_size  # drop_last
            for i in order[rank:usable:world_size]:
                yield i, random.Random(f"{seed}:{index}:{epoch}:{i}").randrange(cache.views)
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


def cached_batches(cfg: TrainJobConfig, model, *, rank: int = 0, world_size: int = 1,
                   start_batch: int = 0) -> Iterator[dict]:
    """Training batches from `cfg.data.feature_cache` for a training job and its built model.

    Refuses (`ConfigError`) random augmentation from one stored view, and (`StaleCacheError`) a cache whose
    datasets differ from `cfg.data.datasets` or that was made with other frozen weights or another transform.
    """
    cache = FeatureCache(cfg.data.feature_cache)
    if cfg.data.augment and cache.views < 2:  # first: a one-view cache made without augmentation is also stale
        raise ConfigError(
            f"data.augment=true, but data.feature_cache={cfg.data.feature_cache!r} holds 1 view per image, so "
            "every pass would train on the same crop; rebuild it with `minigpt4 cache-features --views 4` "
            "(one view is drawn per image per pass), or set data.augment=false"
        )
    cached = [(d["kind"], d["path"]) for d in cache.manifest["datasets"]]
    wanted = [(d.kind, d.path) for d in cfg.data.datasets]
    if cached != wanted:
        raise StaleCacheError(
            f"data.feature_cache={cfg.data.feature_cache!r} holds the datasets {cached}, "
            f"but data.datasets is {wanted}; "
            "rebuild the cache with `minigpt4 cache-features` for this config"
        )
    cache.verify(model, data_transform(cfg))  # under FSDP a collective: every process gets here alike
    return feature_batches(
        cache,
        cfg.data.batch_size,
        seed=cfg.train.seed,
        ratios=[d.ratio for d in cfg.data.datasets],
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
    )
