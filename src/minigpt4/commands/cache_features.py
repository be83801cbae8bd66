"""`minigpt4 cache-features`: precompute the frozen features of a training config's datasets.

Train from the result with `data.feature_cache=DIR` (the same config otherwise): batches then carry
cached features instead of pixels, and the frozen tower is never run during training. The model is
built exactly as `minigpt4 train` builds it (`build_job_model`: same files, same seed for random parts),
so the cache's fingerprint matches the training run's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minigpt4.commands import CommandError
from minigpt4.commands.paths import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the training YAML whose model and data.datasets to use")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for `minigpt4 train`")
    parser.add_argument("--output", type=Path, required=True, help="the cache folder to write")
    parser.add_argument("--views", type=int, default=1,
                        help="augmented views per image; data.augment=true needs at least 2 (one is drawn per pass)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from minigpt4.config import train_config
    from minigpt4.data import summarize_skips
    from minigpt4.device import check_device
    from minigpt4.feature_cache import build_cache, data_transform
    from minigpt4.feature_cache.writer import dataset_samples
    from minigpt4.model.build import build_job_model

    for flag, value, least in (("--views", args.views, 1), ("--batch-size", args.batch_size, 1),
                               ("--threads", args.threads, 0)):
        if value < least:
            raise CommandError(f"{flag} must be at least {least}, got {value}")
    check_output_folder(args.output, "--output")
    cfg = train_config(args.config, args.overrides)  # a ConfigError is one `error:` line (minigpt4.cli)
    if not cfg.data.datasets:
        raise CommandError("data.datasets is empty: nothing to cache; list the training datasets in the config")
    if args.views > 1 and not cfg.data.augment:
        raise CommandError(f"--views {args.views} with data.augment=false would store {args.views} identical "
                           "copies; use --views 1")
    if args.views == 1 and cfg.data.augment:
        raise CommandError("data.augment=true draws a new random crop every pass, which one cached view cannot "
                           "stand in for; pass --views 4 (or more), or set data.augment=false")
    try:  # open every dataset before the model is built: a wrong path fails in a second, not after loading
        for index, dataset in enumerate(cfg.data.datasets):
            dataset_samples(dataset.kind, dataset.path, index, seed=cfg.train.seed,
                            process_captions=cfg.data.process_captions, max_image_bytes=cfg.data.max_image_bytes)
    except ValueError as err:  # remote shards, a malformed annotation file (a missing path: FileNotFoundError)
        raise CommandError(str(err)) from err
    check_device(cfg.model.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = build_job_model(cfg)
    bar = tqdm(desc="caching features", unit="img")
    try:
        count, skipped = build_cache(
            model,
            [(d.kind, d.path) for d in cfg.data.datasets],
            args.output,
            data_transform(cfg),
            views=args.views,
            batch_size=args.batch_size,
            process_captions=cfg.data.process_captions,
            seed=cfg.train.seed,
            progress=bar.update,
            max_image_bytes=cfg.data.max_image_bytes,
        )
    except (FileNotFoundError, ValueError) as err:  # a dataset path that leads to no usable input
        raise CommandError(str(err)) from err
    finally:
        bar.close()
    print(f"cached {count} images x {args.views} view(s) in {time.perf_counter() - start:.0f} s -> {args.output}")
    if skipped:
        print(f"{summarize_skips(skipped)} (see the warnings above)")
    print(f"train from it with: data.feature_cache={args.output}")
    return 0
