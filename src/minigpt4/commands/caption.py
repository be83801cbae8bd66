"""`minigpt4 caption`: describe many images in batches and write JSON lines (resumable)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minigpt4.commands import CommandError
from minigpt4.commands.model_options import (
    add_generation_arguments,
    add_model_arguments,
    generation_settings,
    load_model,
    split_overrides,
)
from minigpt4.commands.paths import check_output_file, read_appended_records

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image in detail."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="PATH | KEY=VALUE",
        help="image files, folders (searched recursively), webdataset shards (.tar, brace patterns) or @LIST "
             "(a text file with one such path per line); section.key=value items override the model config",
    )
    parser.add_argument("-o", "--output", type=Path, default=Path("captions.jsonl"),
                        help="JSON lines out; images already in it (same source and key) are skipped "
                        "(default: captions.jsonl)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked about every image")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(parser)
    add_generation_arguments(parser, greedy_default=True)


@dataclass
class Item:
    """One image to caption: its key within its source (folder-relative path, shard key, or the file), the
    source (folder, shard or file), and its bytes or path."""

    key: str
    source: str
    image: Path | bytes


def _is_shard(spec: str) -> bool:
    return spec.endswith(".tar") or ("{" in spec and ".tar" in spec)


def expand_lists(inputs: list[str], skipped: list[str], within: tuple[Path, ...] = ()) -> list[str]:
    """`inputs` with every `@LIST` replaced by its lines (lists may name lists); a missing list is skipped.

    A list that names itself, directly or through others, is a usage error (it would never end).
    """
    specs: list[str] = []
    for spec in inputs:
        if not spec.startswith("@"):
            specs.append(spec)
            continue
        listing = Path(spec[1:])
        if not listing.is_file():
            skipped.append(f"{spec}: no such list file")
            continue
        if listing.resolve() in within:
            chain = " -> ".join(f"@{path}" for path in (*within, listing.resolve()))
            raise CommandError(f"{spec} includes itself ({chain}); remove the cycle from the list files")
        lines = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
        specs += expand_lists(entries, skipped, (*within, listing.resolve()))
    return specs


def iter_items(specs: list[str], skipped: list[str]) -> Iterator[Item]:
    """Every image named by `specs` (after `expand_lists`), in order; unreadable shards and members go to `skipped`.

    An item's identity is (source, key): the folder and the path inside it, the shard and the
    sample key, or the file itself, so same-named images from different places are different items.
    """
    from minigpt4.data import SkippedSample
    from minigpt4.data.webdataset import IMAGE_EXTENSIONS, expand_shards, read_tar_groups

    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                skipped.append(f"{spec}: no image files in this folder")
            for file in files:
                yield Item(file.relative_to(path).as_posix(), path.as_posix(), file)
        elif _is_shard(spec):
            for shard in expand_shards(spec):
                for entry in read_tar_groups(shard):
                    if isinstance(entry, SkippedSample):
                        skipped.append(f"{entry.source} [{entry.key}]: {entry.reason}")
                        continue
                    key, members = entry
                    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                    if ext is None:
                        skipped.append(f"{shard} [{key}]: no image member")
                        continue
                    yield Item(key, shard, members[ext])
        elif path.is_file():
            yield Item(path.as_posix(), path.as_posix(), path)
        elif path.exists():
            skipped.append(f"{spec}: not a regular file (a FIFO, device or socket); not read")
        else:
            skipped.append(f"{spec}: no such file, folder or shard")


def done_items(output: Path) -> set[tuple[str, str]]:
    """(source, key) of the records already in `output` (`read_appended_records`: a line cut off by an
    interrupted run is dropped and the file repaired, so the next record starts on its own line)."""
    return set(read_appended_records(output, lambda r: (str(r["source"]), str(r["key"])), "a caption record"))


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from minigpt4.chat.generation import generate
    from minigpt4.chat.templates import Message, get_template
    from minigpt4.processing.image import eval_transform, load_batch

    overrides, inputs = split_overrides(args.inputs, keep=lambda item: Path(item).exists())
    if not inputs:
        raise CommandError("give at least one image file, folder or shard")
    for spec in inputs:  # from stat alone: a FIFO or /dev/zero is never opened
        if Path(spec).exists() and not (Path(spec).is_file() or Path(spec).is_dir()):
            raise CommandError(f"{spec} is not a regular file or a folder (a FIFO, device or socket); "
                               "give image files, folders or .tar shards")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    generation_settings(args)  # bad decoding flags fail before the model loads
    check_output_file(args.output, "--output", "captions.jsonl")
    skipped: list[str] = []
    specs = expand_lists(inputs, skipped)
    done = done_items(args.output)
    pending = (item for item in iter_items(specs, skipped) if (item.source, item.key) not in done)
    model = load_model(args, overrides)  # its chat_defaults: what the model records, with the flags applied
    talk = model.chat_defaults
    settings = generation_settings(args, talk.generation)
    template = get_template(talk.template, model.tokenizer)
    prompt = template.render([Message("user", args.prompt, images=1)], talk.system)
    transform = eval_transform(model.config.vision.image_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with args.output.open("a", encoding="utf-8") as out, tqdm(desc="captioning", unit="img", file=sys.stderr) as bar:
        for batch in _batches(pending, args.batch_size):
            good, pixels, errors = load_batch(batch, lambda it: (it.image, f"{it.source} [{it.key}]"), transform)
            skipped += errors
            if good:
                completions = generate(model, [prompt] * len(good), [[p] for p in pixels], settings,
                                       template_stops=template.stop, add_bos=template.add_bos)
                for item, completion in zip(good, completions, strict=True):
                    record = {"key": item.key, "source": item.source, "caption": completion.text,
                              "finish_reason": completion.finish_reason}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()  # a crash loses at most the batch in flight
                written += len(good)
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped))
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"{written} captioned, {len(done)} already done, {len(skipped)} skipped -> {args.output}", file=sys.stderr)
    return 0
