"""`minigpt4 train CONFIG [section.key=value ...]`: run a training job (also under torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="a training job YAML, e.g. configs/stage1_pretrain.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value overrides, e.g. train.lr=3e-5 model.llm.path=/models/vicuna-7b")


def run(args: argparse.Namespace) -> int:
    from minigpt4.config import ConfigError, train_config
    from minigpt4.convert import CheckpointError
    from minigpt4.train.loop import TrainingDiverged, train

    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)  # one console voice: rank 0 (others warn only)
    try:
        cfg = train_config(args.config, args.overrides)
        result = train(cfg)
    except ConfigError as err:
        print(f"config error: {err}")
        return 2
    except (FileNotFoundError, CheckpointError) as err:  # a path in the config that does not lead to usable input
        print(f"error: {err}")
        return 2
    except TrainingDiverged as err:
        print(f"training stopped: {err}")
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
