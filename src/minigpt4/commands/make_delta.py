"""`minigpt4 make-delta`: the delta that turns a base model into a target (the reverse of apply-delta)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt4.commands import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument("--target", type=Path, required=True, help="the fine-tuned model folder")
    parser.add_argument("--max-shard-mb", type=int, default=1024, help="output shard size limit (MiB)")
    parser.add_argument("--output", type=Path, required=True, help="a new folder for the delta")


def run(args: argparse.Namespace) -> int:
    from minigpt4.delta import DeltaError, make_delta

    try:
        make_delta(args.base, args.target, args.output, args.max_shard_mb << 20)
    except DeltaError as err:
        raise CommandError(str(err)) from None
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
