"""What both stages share: from a stream of candidate samples to whole batches, in one process or
spread over DataLoader workers, deterministic and resumable.

Layout of the work. A *slot* is one reader: rank r with DataLoader worker w is slot r * W_per_rank + w,
out of world_size * max(num_workers, 1) slots. Each source splits its samples over the slots so no two
slots read the same sample in a pass. Each slot assembles whole batches; a rank's DataLoader hands them out
round-robin over its workers, which torch does in a fixed order, so the batch sequence of a rank is a pure
function of (seed, rank, world_size, num_workers).

Resume. Every batch carries its slot's *position*: how many stream items (samples, skips, pass ends) the
slot had consumed when the batch was complete. The training loop keeps the latest position of every slot in
its checkpoints; a resumed slot fast-forwards its source by that many items without decoding any image (a
shard reader reads the tar headers and the small caption members, not the image bodies). Without a recorded
position (another rank/worker layout) a slot skips `batch_size` items per batch it had made, which is exact
only when no skipped item was a bad sample or a pass end. Each sample's random augmentation is seeded from the
sample's identity, not from a running RNG, so the skipped batches leave no trace in the ones that follow.

No usable data. A whole pass of a slot over its share without one usable sample raises NoUsableData at the
pass end: a dataset where every image is broken ends with one message instead of spinning forever.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minigpt4.data import NoUsableData, SkippedSample
from minigpt4.processing.image import ImageError, ImageTooLarge, load_image

logger = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class TarMember:
    """Where a tar member's bytes are, for a member that was passed over unread while fast-forwarding."""

    path: str
    offset: int  # of the member's data in the file
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


@dataclass(frozen=True)
class Candidate:
    """A sample whose text is known to be usable; its image is decoded only when it is batched."""

    source: str  # shard path or image file, for messages
    key: str
    image: bytes | TarMember  # encoded, as read (up to data.max_image_bytes), or a tar member passed over unread
    text: str
    seed: int  # seeds this sample's random transform


@dataclass(frozen=True)
class PassEnd:
    """Marks the end of a slot's pass over its share."""

    drop_partial: bool  # drop the partial batch there (drop_last per pass), or let it carry on into the next pass


PASS_END = PassEnd(drop_partial=True)

StreamItem = Union[Candidate, SkippedSample, PassEnd]


class ItemSource(Protocol):
    """A dataset that can list the items of one slot, forever (pass after pass)."""

    name: str
    index: int  # the source's place among the job's datasets (names its slots' positions)

    def items(self, slot: int, num_slots: int, skip: int = 0) -> Iterator[StreamItem]:
        """The slot's items after the first `skip` (a fast-forward that decodes no image)."""
        ...


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
    data = item.image
    if isinstance(data, TarMember):
        try:
            data = data.read()
        except OSError as err:  # the shard of a member passed over unread went away since
            return SkippedSample(item.source, item.key, f"unreadable image: {err}")
    try:
        return load_image(data, name=f"{item.source} [{item.key}]")
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
    position_key: str,
    start: int = 0,
) -> Iterator[dict]:
    """Group candidates into batches of `batch_size`, skipping (and reporting) samples that fail to load.

    `items` begins at item `start` of the slot's stream; each batch's "position" is {position_key: items
    consumed when it was complete}. Raises NoUsableData at the end of a whole pass without a usable sample, or,
    where a pass end drops the partial batch, without a whole batch (it would never yield one).
    """
    images: list[torch.Tensor] = []
    texts: list[str] = []
    keys: list[str] = []
    skipped: list[SkippedSample] = []
    consumed = start
    whole_pass = start == 0  # a pass entered half-way (after a fast-forward) is not judged
    usable, seen, made, reasons = 0, 0, 0, Counter()  # in this pass
    for item in items:
        consumed += 1
        if isinstance(item, PassEnd):
            if whole_pass and not usable:
                raise NoUsableData(_nothing_usable(name, position_key, seen, reasons))
            if whole_pass and item.drop_partial and not made:
                raise NoUsableData(f"{name}: only {usable} usable samples in a whole pass of reader "
                                   f"{_reader(position_key)}, fewer than one batch of {batch_size}; lower "
                                   f"data.batch_size or data.num_workers, or run `minigpt4 data check {name}`")
            whole_pass, usable, seen, made, reasons = True, 0, 0, 0, Counter()
            if item.drop_partial:
                images, texts, keys = [], [], []
            continue
        seen += 1
        result = item if isinstance(item, SkippedSample) else decode(item)
        if isinstance(result, Image.Image):
            result = transform_sample(transform, result, item)
        if isinstance(result, SkippedSample):
            logger.warning("skipped %s", result)
            skipped.append(result)
            reasons[result.reason.split(":")[0]] += 1
            continue
        usable += 1
        images.append(result)
        texts.append(item.text)
        keys.append(item.key)
        if len(keys) < batch_size:
            continue
        yield {"image": torch.stack(images), "text": texts, "key": keys, "skipped": skipped, "dataset": name,
               "position": {position_key: consumed}}
        made += 1
        images, texts, keys, skipped = [], [], [], []


def _reader(position_key: str) -> str:
    """"0/3/4" (source 0, slot 3 of 4) -> "3 of 4"."""
    return position_key.split("/", 1)[1].replace("/", " of ")


def _nothing_usable(name: str, position_key: str, seen: int, reasons: Counter) -> str:
    slot = _reader(position_key)
    if not seen:
        return (f"{name}: reader {slot} found no sample at all in a whole pass (an empty dataset, or fewer samples "
                "than readers); check the path, or use fewer data.num_workers or processes")
    detail = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    return (f"{name}: no usable sample in a whole pass of reader {slot} ({seen} skipped: {detail}); "
            f"run `minigpt4 data check {name}` to list them")


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
        positions: dict[str, int] | None = None,
    ) -> None:
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.start_batch = start_batch
        self.positions = positions or {}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        per_rank = max(self.num_workers, 1)
        # DataLoader always starts its round-robin at worker 0, but batch `start_batch` belongs to logical
        # worker start_batch % per_rank: rotate, so physical worker 0 plays that one.
        logical = (worker + self.start_batch) % per_rank
        slot, num_slots = self.rank * per_rank + logical, self.world_size * per_rank
        key = position_key(self.source.index, slot, num_slots)
        made = len(range(logical, self.start_batch, per_rank))  # this worker's batches before start_batch
        skip = self.positions.get(key)
        if skip is None:
            skip = made * self.batch_size
            if made:
                logger.warning("%s: no recorded stream position for reader %s; skipping %d items, exact only if the "
                               "skipped part held no bad sample and no pass end", self.source.name, key, skip)
        items = self.source.items(slot, num_slots, skip)
        batches = assemble_batches(items, self.transform, self.batch_size, name=self.source.name,
                                   position_key=key, start=skip)
        return _errors_as_batches(batches)


def position_key(source_index: int, slot: int, num_slots: int) -> str:
    """How checkpoints name a reader: a position recorded under another layout does not match any key."""
    return f"{source_index}/{slot}/{num_slots}"


def _errors_as_batches(batches: Iterator[dict]) -> Iterator[dict]:
    """Pass NoUsableData on as a batch: DataLoader would re-raise it wrapped in a worker traceback."""
    try:
        yield from batches
    except NoUsableData as err:
        yield {"no_usable_data": str(err)}


def rank_batches(dataset: SlotBatches) -> Iterator[dict]:
    """Iterate a rank's batches, in this process (num_workers=0) or over DataLoader worker processes."""
    if dataset.num_workers == 0:
        batches = iter(dataset)
    else:
        # batch_size=None: the workers already yield whole batches; the loader only forwards them in order.
        batches = iter(DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers))
    for batch in batches:
        if "no_usable_data" in batch:
            raise NoUsableData(batch["no_usable_data"])
        yield batch


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
