"""Stage 2: the `cc_sbu_align` folder of curated image-description pairs.

    ROOT/filter_cap.json   {"annotations": [{"image_id": "2", "caption": "..."}, ...]}
    ROOT/image/2.jpg ...

Captions are used raw (the original applies no text processor in stage 2). Each pass is a fresh permutation
seeded by (seed, pass), cut to a multiple of the number of readers and dealt out to them (like
DistributedSampler, without padding); a reader's partial last batch of a pass is dropped (drop_last).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from itertools import count
from pathlib import Path

from minigpt4.data import SkippedSample
from minigpt4.data.pipeline import (
    PASS_END,
    Candidate,
    ImageTransform,
    SlotBatches,
    StreamItem,
    check_layout,
    rank_batches,
    stable_seed,
)
from minigpt4.processing.image import MAX_IMAGE_BYTES, ImageError, ImageTooLarge, read_image_file

ANNOTATION_FILE = "filter_cap.json"
IMAGE_DIR = "image"


def read_annotations(root: str | Path) -> list[tuple[str, object]]:
    """(image_id, caption) per annotation, in file order; the caption is whatever the file holds.

    Raises:
        FileNotFoundError / ValueError: naming the file, when it is missing or not the cc_sbu_align layout.
    """
    path = Path(root) / ANNOTATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a cc_sbu_align folder holds {ANNOTATION_FILE} and {IMAGE_DIR}/")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f'{path} must be {{"annotations": [{{"image_id": ..., "caption": ...}}, ...]}}')
    return [
        (str(entry.get("image_id", "")) if isinstance(entry, dict) else "",
         entry.get("caption") if isinstance(entry, dict) else None)
        for entry in data["annotations"]
    ]


class AlignedSource:
    """The annotations of one aligned folder, dealt to slots pass after pass."""

    def __init__(self, root: str | Path, *, seed: int, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.root = Path(root)
        self.name = str(root)
        self.index = 0  # the only source of a stage-2 job
        self.seed = seed
        self.max_image_bytes = max_image_bytes
        self.annotations = read_annotations(root)
        self.annotation_file = str(self.root / ANNOTATION_FILE)

    def per_slot(self, num_slots: int) -> int:
        return len(self.annotations) // num_slots

    def items(self, slot: int, num_slots: int, skip: int = 0) -> Iterator[StreamItem]:
        share = self.per_slot(num_slots)
        # A pass is `share` items and a PASS_END: a fast-forward is arithmetic, no image file is touched.
        first_epoch, offset = divmod(skip, share + 1)
        for epoch in count(first_epoch):
            order = list(range(len(self.annotations)))
            random.Random(stable_seed("aligned", self.seed, epoch)).shuffle(order)
            for index in order[: share * num_slots][slot::num_slots][offset:]:
                yield self.annotation_item(index, epoch)
            yield PASS_END
            offset = 0

    def one_pass(self) -> Iterator[Candidate | SkippedSample]:
        """Every annotation once, in file order, skips included (what the feature cache stores)."""
        return (self.annotation_item(index, 0) for index in range(len(self.annotations)))

    def annotation_item(self, index: int, epoch: int) -> Candidate | SkippedSample:
        image_id, caption = self.annotations[index]
        key = image_id or f"annotation {index}"
        if not image_id:
            return SkippedSample(self.annotation_file, key, "bad annotation: no image_id")
        if not isinstance(caption, str):
            return SkippedSample(self.annotation_file, image_id, "no caption: 'caption' missing or not a string")
        if not caption.strip():
            return SkippedSample(self.annotation_file, image_id, "empty caption")
        path = str(self.root / IMAGE_DIR / f"{image_id}.jpg")
        image = read_listed_image(path, image_id, self.max_image_bytes)
        if isinstance(image, SkippedSample):
            return image
        return Candidate(source=path, key=image_id, image=image, text=caption,
                         seed=stable_seed("aligned-sample", self.seed, epoch, index))


def read_listed_image(path: str, key: str, max_image_bytes: int) -> bytes | SkippedSample:
    """The bytes of an image a listing names, or the skip that says why it cannot be used.

    Regular files only, up to `max_image_bytes`, checked before reading (shared by every listed-file source).
    """
    try:
        return read_image_file(path, max_image_bytes)
    except FileNotFoundError:
        return SkippedSample(path, key, "missing image: file not found")
    except ImageTooLarge as err:
        return SkippedSample(path, key, f"too large: {err} (not read)")
    except ImageError as err:
        return SkippedSample(path, key, f"unreadable image: {err}")


def stage2_batches(
    root: str,
    transform: ImageTransform,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
    positions: dict[str, int] | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Iterator[dict]:
    """An endless stream of stage-2 batches from a cc_sbu_align folder (raw captions, drop_last per pass).

    Arguments as `stage1_batches`; `root` is the folder holding filter_cap.json and image/.
    """
    check_layout(batch_size, rank, world_size, num_workers, start_batch)
    source = AlignedSource(root, seed=seed, max_image_bytes=max_image_bytes)
    return listed_batches(source, "annotations", transform, batch_size, rank=rank, world_size=world_size,
                          num_workers=num_workers, start_batch=start_batch, positions=positions)


def listed_batches(
    source: AlignedSource,
    items: str,
    transform: ImageTransform,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    start_batch: int,
    positions: dict[str, int] | None,
) -> Iterator[dict]:
    """Batches of a listing source, after checking each reader gets a batch per pass (`items` names its records)."""
    readers = world_size * max(num_workers, 1)
    if source.per_slot(readers) < batch_size:
        raise ValueError(
            f"{source.annotation_file} has {len(source.annotations)} {items}: too few for batch_size {batch_size} "
            f"on {world_size} rank(s) x {max(num_workers, 1)} reader(s) each; lower batch_size or num_workers"
        )
    return rank_batches(SlotBatches(source, transform, batch_size, rank=rank, world_size=world_size,
                                    num_workers=num_workers, start_batch=start_batch, positions=positions))
