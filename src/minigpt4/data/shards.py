"""Writing img2dataset-style shards (for `minigpt4 data make-shards`) and reading the inputs they come from."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image
from webdataset import TarWriter

from minigpt4.data import SkippedSample
from minigpt4.data.pipeline import image_problem
from minigpt4.data.webdataset import IMAGE_EXTENSIONS, read_tar_groups, sample_caption
from minigpt4.processing.image import ImageError, load_image, read_image_file

JPEG_QUALITY = 95  # what img2dataset writes
KEPT_METADATA = ("url", "original_width", "original_height")  # from an img2dataset .json, when re-sharding


@dataclass
class SourceSample:
    """One input pair for make-shards: the encoded image and its caption, plus where it came from."""

    origin: str  # file or shard the pair was read from, for messages and the "url" field
    key: str
    image: bytes
    caption: str | None
    meta: dict


class ShardWriter:
    """Writes numbered shards `00000.tar, 00001.tar, ...` of `per_shard` samples: KEY.jpg + KEY.json + KEY.txt.

    Keys follow img2dataset: the shard number then the index inside the shard. Each shard is written under a
    temporary name and renamed when complete, so an interrupted run never leaves a half shard that looks whole.
    """

    def __init__(self, out_dir: str | Path, per_shard: int) -> None:
        if per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.per_shard = per_shard
        self.key_digits = len(str(per_shard - 1))
        self.shards: list[Path] = []
        self.written = 0
        self._writer: TarWriter | None = None
        self._in_shard = 0

    def add(self, jpeg: bytes, caption: str, meta: dict) -> str:
        """Append one sample; returns its key."""
        if self._writer is None or self._in_shard == self.per_shard:
            self._finish_shard()
            self._writer = TarWriter(str(self._partial_path(len(self.shards))), mtime=0)
            self._in_shard = 0
        key = f"{len(self.shards):05d}{self._in_shard:0{self.key_digits}d}"
        record = {**meta, "caption": caption, "key": key, "status": "success"}
        self._writer.write({"__key__": key, "jpg": jpeg, "json": json.dumps(record).encode("utf-8"),
                            "txt": caption.encode("utf-8")})
        self._in_shard += 1
        self.written += 1
        return key

    def close(self) -> list[Path]:
        self._finish_shard()
        return self.shards

    def _partial_path(self, number: int) -> Path:
        return self.out_dir / f"{number:05d}.tar.partial"

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self.out_dir / f"{len(self.shards):05d}.tar"
        os.replace(self._partial_path(len(self.shards)), final)
        self.shards.append(final)
        self._writer = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_jpeg(data: bytes, name: str) -> tuple[bytes, int, int]:
    """Check that `data` decodes; return JPEG bytes (JPEGs unchanged, others re-encoded) and the size.

    The original's stage-1 pipeline reads only the `.jpg` member, so every shard image is a JPEG.
    Raises ImageError naming the image when it does not decode.
    """
    image = load_image(data, name=name)
    with Image.open(io.BytesIO(data)) as probe:
        is_jpeg = probe.format == "JPEG"
    if is_jpeg:
        return data, image.width, image.height
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), image.width, image.height


def read_caption_table(path: str | Path, image_col: str, caption_col: str) -> Iterator[tuple[int, dict]]:
    """(line/row number, record) from a JSONL, JSON list, CSV or TSV file of image paths and captions."""
    path = Path(path)
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            missing = {image_col, caption_col} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: no column {sorted(missing)} (columns: {reader.fieldnames}); "
                                 "name them with --image-col/--caption-col")
            for number, row in enumerate(reader, start=2):
                yield number, row
        elif suffix == ".json":
            records = json.load(handle)
            if isinstance(records, dict) and isinstance(records.get("annotations"), list):
                records = records["annotations"]
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of records")
            for number, record in enumerate(records, start=1):
                yield number, record if isinstance(record, dict) else {}
        else:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = {}
                yield number, record if isinstance(record, dict) else {}


def samples_from_table(
    table: str | Path, images: str | Path, image_col: str = "image", caption_col: str = "caption"
) -> Iterator[SourceSample | SkippedSample]:
    """Pairs listed in a caption table, image paths relative to `images` (or absolute)."""
    for number, record in read_caption_table(table, image_col, caption_col):
        where = f"{table}:{number}"
        name = record.get(image_col)
        if not isinstance(name, str) or not name:
            yield SkippedSample(where, "", f"bad record: no '{image_col}' field")
            continue
        image_path = Path(images) / name
        try:
            data = read_image_file(image_path)
        except FileNotFoundError as err:
            yield SkippedSample(str(image_path), name, f"missing image: {err.strerror or err}")
            continue
        except ImageError as err:  # a directory, FIFO or device, or over max_image_bytes: not read
            yield SkippedSample(str(image_path), name, f"unreadable image: {err}")
            continue
        caption = record.get(caption_col)
        yield SourceSample(str(image_path), name, data, caption if isinstance(caption, str) else None,
                           {"url": name})


def samples_from_img2dataset(folder: str | Path) -> Iterator[SourceSample | SkippedSample]:
    """Pairs from an img2dataset output folder: its webdataset shards, or (output_format files) KEY.jpg + KEY.json/.txt."""
    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if tars:
        for shard in tars:
            for entry in read_tar_groups(str(shard)):
                if isinstance(entry, SkippedSample):
                    yield entry
                    continue
                key, members = entry
                yield _from_members(str(shard), key, members)
        return
    for image_path in sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
        try:
            members = {"img": read_image_file(image_path)}
        except (FileNotFoundError, ImageError) as err:  # a directory, FIFO or device, or over max_image_bytes
            yield SkippedSample(str(image_path), image_path.stem, f"unreadable image: {err}")
            continue
        for ext in ("json", "txt"):
            sidecar = image_path.with_suffix(f".{ext}")
            if sidecar.is_file():
                members[ext] = sidecar.read_bytes()
        yield _from_members(str(image_path), image_path.stem, members)


def _from_members(origin: str, key: str, members: dict[str, bytes]) -> SourceSample | SkippedSample:
    image_ext = next((ext for ext in ("img", *IMAGE_EXTENSIONS) if ext in members), None)
    if image_ext is None:
        return SkippedSample(origin, key, f"no image: no member .{'/.'.join(IMAGE_EXTENSIONS)}")
    try:
        caption = sample_caption(members)
    except ValueError as err:
        return SkippedSample(origin, key, str(err))
    # sample_caption already parsed the .json; keep the fields that still describe the re-written sample.
    loaded = json.loads(members["json"]) if "json" in members else {}
    meta = {k: v for k, v in loaded.items() if k in KEPT_METADATA} if isinstance(loaded, dict) else {}
    return SourceSample(origin, key, members[image_ext], caption, meta)


def write_samples(
    samples: Iterator[SourceSample | SkippedSample], writer: ShardWriter
) -> list[SkippedSample]:
    """Write every usable pair; return what was skipped (undecodable image, missing or empty caption)."""
    skipped: list[SkippedSample] = []
    for sample in samples:
        if isinstance(sample, SkippedSample):
            skipped.append(sample)
            continue
        if sample.caption is None:
            skipped.append(SkippedSample(sample.origin, sample.key, "no caption"))
            continue
        caption = sample.caption.strip()
        if not caption:
            skipped.append(SkippedSample(sample.origin, sample.key, "empty caption"))
            continue
        try:
            jpeg, width, height = as_jpeg(sample.image, name=sample.origin)
        except ImageError as err:
            skipped.append(SkippedSample(sample.origin, sample.key, f"corrupt image: {image_problem(err)}"))
            continue
        writer.add(jpeg, caption, {**sample.meta, "width": width, "height": height})
    return skipped
