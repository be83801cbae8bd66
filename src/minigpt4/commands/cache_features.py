"""`minigpt4 cache-features`: precompute the frozen features of a training config's datasets.

Train from the result with `data.feature_cache=DIR` (the same config otherwise): batches then carry
cached features instead of pixels, and the frozen tower is never run during training.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the training YAML whose model and data.datasets to use")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for `minigpt4 train`")
    parser.add_argument("--output", type=Path, required=True, help="the cache folder to write")
    parser.add_argument("--views", type=int, default=1, help="augmented views per image (with data.augment=true)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from minigpt4.config import train_config
    from minigpt4.feature_cache import build_cache, data_transform
    from minigpt4.model.build import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = train_config(args.config, args.overrides)
    if not cfg.data.datasets:
        print("data.datasets is empty: nothing to cache")
        return 2
    if args.views > 1 and not cfg.data.augment:
        print(f"--views {args.views} with data.augment=false would store {args.views} identical copies; use --views 1")
        return 2
    start = time.perf_counter()
    model = build_model(cfg.model)
    transform = data_transform(cfg)
    bar = tqdm(desc="caching features", unit="img")
    count, skipped = build_cache(
        model,
        [(d.kind, d.path) for d in cfg.data.datasets],
        args.output,
        transform,
        views=args.views,
        batch_size=args.batch_size,
        process_captions=cfg.data.process_captions,
        seed=cfg.train.seed,
        progress=bar.update,
    )
    bar.close()
    print(f"cached {count} images x {args.views} view(s) in {time.perf_counter() - start:.0f} s -> {args.output}")
    if skipped:
        print(f"skipped {len(skipped)} bad samples (see the warnings above)")
    print(f"train from it with: data.feature_cache={args.output}")
    return 0
