"""`minigpt4 train CONFIG [section.key=value ...]`: run a training job (also under torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from minigpt4.commands.model_options import fill_released_files
from minigpt4.commands.paths import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="a training job YAML, e.g. configs/stage1_pretrain.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value overrides, e.g. train.lr=3e-5 model.llm.path=/models/vicuna-7b")


def run(args: argparse.Namespace) -> int:
    from minigpt4.config import train_config
    from minigpt4.data import NoUsableData
    from minigpt4.device import check_device
    from minigpt4.train.checkpoint import CheckpointSaveError
    from minigpt4.train.loop import TrainingDiverged, train

    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)  # one console voice: rank 0 (others warn only)
    # Input errors (ConfigError, CheckpointError, a missing path) end as one `error:` line in minigpt4.cli.
    cfg = train_config(args.config, args.overrides)
    # Empty frozen-part paths of a released preset come from the cache (fetched on first use by a single
    # process; under torchrun every rank only reads the cache). The projection is never filled: it is trained.
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    fill_released_files(cfg.model, cfg.preset, no_fetch=not single, roles=("vit", "blip2", "llm"))
    check_device(cfg.model.device)
    check_output_folder(Path(cfg.train.output_dir), "train.output_dir")
    try:
        result = train(cfg)
    except (TrainingDiverged, CheckpointSaveError, NoUsableData) as err:  # the run started but cannot go on
        print(f"error: {err}", file=sys.stderr)
        return 1
    main = os.environ.get("RANK", "0") == "0"
    if result.stopped_by_signal:
        if main:
            print(f"stopped by SIGTERM after step {result.steps}; saved {result.checkpoint}. "
                  "Run the same command with train.resume=auto to continue.")
        return 143  # 128 + SIGTERM: the job did not finish, so `train stage1 && train stage2` stops here
    if main:
        print(f"final loss {result.final_loss:.4f} after {result.steps} steps; "
              f"{result.tokens_per_second:.0f} tokens/s, {result.samples_per_second:.1f} samples/s; "
              f"skipped {result.skipped} bad samples")
        print(f"checkpoint: {result.checkpoint}")
        print(f"logs: {result.log_dir / 'train_log.jsonl'} and {result.log_dir / 'tensorboard'}")
    return 0
