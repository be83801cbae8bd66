"""What both stages share: from a stream of candidate samples to whole batches, in one process or
spread over DataLoader workers, deterministic and resumable.

Layout of the work. A *slot* is one reader: rank r with DataLoader worker w is slot r * W_per_rank + w,
out of world_size * max(num_workers, 1) slots. Each source splits its samples over the slots so no two
slots read the same sample in a pass. Each slot assembles whole batches; a rank's DataLoader hands them out
round-robin over its workers, which torch does in a fixed order, so the batch sequence of a rank is a pure
function of (seed, rank, world_size, num_workers).

Resume. To start at batch n, every slot replays its share of the first n batches without running the
image transform (it must still decode the images: a corrupt image changes which samples fill a batch).
Each sample's random augmentation is seeded from the sample's identity, not from a running RNG, so the
skipped batches leave no trace in the ones that follow.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minigpt4.data import SkippedSample
from minigpt4.processing.image import ImageError, ImageTooLarge, load_image

logger = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    """A sample whose text is known to be usable; its image is decoded only when it is batched."""

    source: str  # shard path or image file, for messages
    key: str
    image: bytes  # encoded, as read (up to data.max_image_bytes) from a tar member or an image file
    text: str
    seed: int  # seeds this sample's random transform


class PassEnd:
    """Marks the end of a slot's pass over its share; a partial batch is dropped there (drop_last)."""


PASS_END = PassEnd()

StreamItem = Union[Candidate, SkippedSample, PassEnd]


class ItemSource(Protocol):
    """A dataset that can list the items of one slot, forever (pass after pass)."""

    name: str

    def items(self, slot: int, num_slots: int) -> Iterator[StreamItem]: ...


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any reprs; unlike hash() it is the same in every process and every run."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_transform(transform: ImageTransform, image: Image.Image, seed: int) -> torch.Tensor:
    """Run `transform` with the CPU torch and Python RNGs seeded from `seed`, then restore the callers' states.

    Only the CPU generator is touched (torch.manual_seed would also reseed every accelerator, and costs 100x more).
    """
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        return transform(image)
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


def image_problem(err: ImageError) -> str:
    """The decoder's message for a skip reason, without the noise of an in-memory file's repr."""
    cause = err.__cause__ or err
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image data", f"{type(cause).__name__}: {cause}")


def decode(item: Candidate) -> Image.Image | SkippedSample:
    """The candidate's image as RGB, or why it cannot be used."""
    try:
        return load_image(item.image, name=f"{item.source} [{item.key}]")
    except ImageTooLarge as err:  # over max_image_pixels, or a JPEG of too many scans
        return SkippedSample(item.source, item.key, f"too large: {err}")
    except ImageError as err:
        return SkippedSample(item.source, item.key, f"corrupt image: {image_problem(err)}")


def transform_sample(transform: ImageTransform, image: Image.Image, item: Candidate) -> torch.Tensor | SkippedSample:
    """`transform(image)` seeded from `item.seed`, or why it failed (as a skip)."""
    try:
        return seeded_transform(transform, image, item.seed)
    except Exception as err:  # a transform failing on one odd image must not end the run
        return SkippedSample(item.source, item.key, f"transform failed: {type(err).__name__}: {err}")


def assemble_batches(
    items: Iterator[StreamItem],
    transform: ImageTransform,
    batch_size: int,
    *,
    name: str,
    replay: int = 0,
) -> Iterator[dict]:
    """Group candidates into batches of `batch_size`, skipping (and reporting) samples that fail to load.

    The first `replay` batches are assembled without transforming and not yielded (see the module doc).
    Replay assumes the transform succeeds on every decodable image; one that fails is the only case where
    a resumed stream can differ from the uninterrupted one.
    """
    images: list[torch.Tensor | None] = []
    texts: list[str] = []
    keys: list[str] = []
    skipped: list[SkippedSample] = []
    made = 0
    for item in items:
        replaying = made < replay
        if isinstance(item, PassEnd):
            images, texts, keys = [], [], []
            continue
        result = item if isinstance(item, SkippedSample) else decode(item)
        if isinstance(result, Image.Image) and not replaying:
            result = transform_sample(transform, result, item)
        if isinstance(result, SkippedSample):
            # While replaying for a resume, these were already reported by the run being resumed.
            logger.log(logging.DEBUG if replaying else logging.WARNING, "skipped %s", result)
            skipped.append(result)
            continue
        images.append(None if replaying else result)
        texts.append(item.text)
        keys.append(item.key)
        if len(keys) < batch_size:
            continue
        if not replaying:
            yield {"image": torch.stack(images), "text": texts, "key": keys, "skipped": skipped, "dataset": name}
        made += 1
        images, texts, keys, skipped = [], [], [], []


class SlotBatches(IterableDataset):
    """The batches of one rank of one source, as an IterableDataset that DataLoader workers split by slot."""

    def __init__(
        self,
        source: ItemSource,
        transform: ImageTransform,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        start_batch: int,
    ) -> None:
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        per_rank = max(self.num_workers, 1)
        # DataLoader always starts its round-robin at worker 0, but batch `start_batch` belongs to logical
        # worker start_batch % per_rank: rotate, so physical worker 0 plays that one.
        logical = (worker + self.start_batch) % per_rank
        replay = len(range(logical, self.start_batch, per_rank))  # this worker's batches before start_batch
        slot = self.rank * per_rank + logical
        items = self.source.items(slot, self.world_size * per_rank)
        return assemble_batches(items, self.transform, self.batch_size, name=self.source.name, replay=replay)


def rank_batches(dataset: SlotBatches) -> Iterator[dict]:
    """Iterate a rank's batches, in this process (num_workers=0) or over DataLoader worker processes."""
    if dataset.num_workers == 0:
        return iter(dataset)
    # batch_size=None: the workers already yield whole batches; the loader only forwards them in order.
    loader = DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers)
    return iter(loader)


def check_layout(batch_size: int, rank: int, world_size: int, num_workers: int, start_batch: int) -> None:
    """Fail early, naming the argument, on a batch/rank/worker layout that cannot work."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
