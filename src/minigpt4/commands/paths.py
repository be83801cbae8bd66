"""Checks on the output paths users give, run before any work so a wrong path costs nothing."""

from __future__ import annotations

from pathlib import Path

from minigpt4.commands import CommandError


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
