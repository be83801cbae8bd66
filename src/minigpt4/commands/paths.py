"""Checks on the output paths users give, run before any work so a wrong path costs nothing."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from minigpt4.commands import CommandError

log = logging.getLogger(__name__)
T = TypeVar("T")


def _named(name: str, path: Path) -> str:
    """`--output x` for a flag or a phrase, `train.output_dir='x'` for a config key."""
    return f"{name} {path}" if name.startswith("--") or " " in name else f"{name}={str(path)!r}"


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of `path` that is a file (so no folder can be made there)."""
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)


def check_output_folder(path: Path, name: str) -> None:
    """`path` can be (or already is) a folder: it is not a file, nor under one."""
    if path.exists() and not path.is_dir():
        raise CommandError(f"{_named(name, path)} is a file, but a folder is needed there; give a new or existing "
                           "folder")
    blocking = _file_in_the_way(path)
    if blocking is not None:
        raise CommandError(f"{_named(name, path)}: {blocking} is a file, not a folder")


def check_output_file(path: Path, name: str, example: str) -> None:
    """`path` can be written as a file: it is not a folder, and its parent is (or can become) a folder."""
    if path.is_dir():
        raise CommandError(f"{_named(name, path)} is a folder; give a file in it, e.g. {_named(name, path / example)}")
    blocking = _file_in_the_way(path)
    if blocking is not None:
        raise CommandError(f"{_named(name, path)}: {blocking} is a file, not a folder")


def read_appended_records(path: Path, parse: Callable[[dict], T], what: str, repair: bool = True) -> list[T]:
    """`parse` of each record of a JSON-lines file that a command appends to and resumes from (none: no file).

    An interrupted run can leave a last line without its newline (cut off, or whole): a cut-off line is dropped
    and, with `repair` (the process that appends to `path`), the file is rewritten without it, so that the next
    record starts on a line of its own. Any other line that is not a record (`parse` raising KeyError, TypeError
    or ValueError) is an error naming it: the file is not ours to guess about.
    """
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    records: list[T] = []
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(parse(json.loads(line)))  # JSONDecodeError is a ValueError
            kept.append(line)
        except (KeyError, TypeError, ValueError) as err:
            if number < len(lines):  # a line with its newline: not an interruption's doing
                raise CommandError(f"{path} line {number} is not {what} ({err}); delete or fix it") from None
            log.warning("%s: dropping its last line, cut off by an interrupted run", path)
    if repair and text and not text.endswith("\n"):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return records
