"""`minigpt4 fetch PRESET`: download and verify the released files a preset needs."""

from __future__ import annotations

import argparse
import sys

from minigpt4.commands import CommandError
from minigpt4.hub.sources import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", choices=list(PRESETS), help="the released model to fetch")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file again (not only size and mtime) against the recorded sha256 and, for "
                        "Hub files, the Hub's hash")


def run(args: argparse.Namespace) -> int:
    import logging

    from minigpt4.hub.fetch import DownloadError, Fetcher, describe

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request: the progress bar says more

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    fetcher = Fetcher(report=say)
    missing = fetcher.missing(args.preset)
    if missing:
        say(f"{args.preset}: fetching {describe(missing)} into {fetcher.cache} (Hub repos: the Hugging Face cache)")
    try:
        paths = fetcher.fetch_preset(args.preset, verify=args.verify)
    except DownloadError as err:
        raise CommandError(str(err)) from None
    for role, path in paths.items():
        print(f"{role}: {path}")
    verb = "verified (sha256)" if args.verify else "complete"
    say(f"{args.preset} is {verb} in the cache")
    return 0
