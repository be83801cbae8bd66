"""`minigpt4 caption`: describe many images in batches and write JSON lines (resumable)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minigpt4.commands.model_options import (
    add_generation_arguments,
    add_model_arguments,
    generation_settings,
    load_model,
    split_overrides,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image in detail."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="PATH | KEY=VALUE",
        help="image files, folders (searched recursively), webdataset shards (.tar, brace patterns) or @LIST "
             "(a text file with one such path per line); section.key=value items override the model config",
    )
    parser.add_argument("-o", "--output", type=Path, default=Path("captions.jsonl"),
                        help="JSON lines out; keys already in it are skipped (default: captions.jsonl)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked about every image")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(parser)
    add_generation_arguments(parser, greedy_default=True)


@dataclass
class Item:
    """One image to caption: its key in the output, where it comes from, and its bytes or path."""

    key: str
    source: str
    image: Path | bytes


def _is_shard(spec: str) -> bool:
    return spec.endswith(".tar") or ("{" in spec and ".tar" in spec)


def iter_items(inputs: list[str], skipped: list[str]) -> Iterator[Item]:
    """Every image named by `inputs`, in order; unreadable shards and members are added to `skipped`."""
    from minigpt4.data import SkippedSample
    from minigpt4.data.webdataset import IMAGE_EXTENSIONS, expand_shards, read_tar_groups

    for spec in inputs:
        path = Path(spec)
        if spec.startswith("@"):
            listing = Path(spec[1:])
            if not listing.is_file():
                skipped.append(f"{spec}: no such list file")
                continue
            lines = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
            yield from iter_items([line for line in lines if line and not line.startswith("#")], skipped)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                skipped.append(f"{spec}: no image files in this folder")
            for file in files:
                yield Item(file.relative_to(path).as_posix(), spec, file)
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
            yield Item(spec, spec, path)
        else:
            skipped.append(f"{spec}: no such file, folder or shard")


def done_keys(output: Path) -> set[str]:
    """Keys already captioned in `output` (a cut-off last line from an interrupted run is ignored)."""
    keys: set[str] = set()
    if not output.exists():
        return keys
    with output.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s line %d is not a caption record; ignored", output, number)
    return keys


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
    from minigpt4.processing.image import ImageError, eval_transform, load_image

    overrides, inputs = split_overrides(args.inputs, keep=lambda item: Path(item).exists())
    if not inputs:
        print("error: give at least one image file, folder or shard", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    settings = generation_settings(args)
    done = done_keys(args.output)
    skipped: list[str] = []
    pending = (item for item in iter_items(inputs, skipped) if item.key not in done)
    model = load_model(args, overrides)
    template = get_template(args.template, model.tokenizer)
    prompt = template.render([Message("user", args.prompt, images=1)], args.system)
    transform = eval_transform(model.config.vision.image_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with args.output.open("a", encoding="utf-8") as out, tqdm(desc="captioning", unit="img", file=sys.stderr) as bar:
        for batch in _batches(pending, args.batch_size):
            good, pixels = [], []
            for item in batch:
                try:
                    pixels.append(transform(load_image(item.image, name=f"{item.source} [{item.key}]")))
                    good.append(item)
                except (ImageError, FileNotFoundError) as err:
                    skipped.append(str(err))
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
