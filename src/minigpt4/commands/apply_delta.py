"""`minigpt4 apply-delta`: base LLaMA + delta weights (Vicuna v0's release form) -> a model folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minigpt4.commands import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="the base model folder (e.g. LLaMA in HF format)")
    parser.add_argument("--delta", type=Path, required=True, help="the delta folder (e.g. lmsys/vicuna-7b-delta-v0)")
    parser.add_argument("--max-shard-mb", type=int, default=1024, help="output shard size limit (MiB)")
    parser.add_argument("--output", type=Path, required=True, help="a new folder for the merged model")
    parser.add_argument("--check", action="store_true", help="re-read the output and compare it with base + delta")


def run(args: argparse.Namespace) -> int:
    from minigpt4.delta import DeltaError, apply_delta, check_applied

    start = time.perf_counter()
    try:
        apply_delta(args.base, args.delta, args.output, args.max_shard_mb << 20)
        print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if args.check:
            count = check_applied(args.base, args.delta, args.output)
            print(f"checked: all {count} tensors of {args.output} equal base + delta", file=sys.stderr)
    except DeltaError as err:
        raise CommandError(str(err)) from None
    return 0
