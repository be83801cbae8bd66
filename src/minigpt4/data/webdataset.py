"""Stage 1: image-caption pairs from webdataset tar shards, as img2dataset writes them.

A shard `00042.tar` holds, per sample, `KEY.jpg` (or .jpeg/.png/.webp) with `KEY.json` ({"caption": ...})
and/or `KEY.txt`. Several datasets are mixed by ratio, one dataset per batch, as the original does
(LAION : CC+SBU = 115 : 14).

Why plain `tarfile` and not a `webdataset.DataPipeline`: the original's pipeline resamples shards and
shuffles with RNGs seeded from time and pid, and its error handlers only warn. Exact resume (`start_batch`)
needs every random choice to be a function of the seed, and the training loop needs each bad sample as data
(shard, key, reason), also from worker processes. Reading a tar member by member is a few lines, so we do
that and keep `webdataset` for what it is good at here: expanding shard specs (`{00000..00099}`, `::`).
A truncated tar is detected by checking for the end-of-archive block, which `tarfile` silently accepts as missing.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tarfile
from itertools import count
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

from webdataset.shardlists import expand_urls

from minigpt4.data import SkippedSample
from minigpt4.data.pipeline import (
    Candidate,
    ImageTransform,
    PassEnd,
    SlotBatches,
    StreamItem,
    TarMember,
    check_layout,
    rank_batches,
    stable_seed,
)
from minigpt4.processing.image import MAX_IMAGE_BYTES
from minigpt4.processing.text import process_caption

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("json", "txt")  # always read: whether a sample is usable depends on them


ShardSpec = Union[str, Sequence[str]]


def expand_shards(spec: ShardSpec) -> list[str]:
    """Shard paths from a spec: brace patterns joined by `::`, folders (all their *.tar, sorted), or a list of those."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for part in (path for pattern in parts for path in expand_urls(str(pattern))):
        if Path(part).is_dir():
            paths.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
        else:
            paths.append(part)
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> ("dir/000123", "jpg"): the webdataset convention (key = up to the first dot)."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def read_tar_groups(
    path: str, max_member_bytes: int = MAX_IMAGE_BYTES, skip_bodies: Callable[[], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes | TarMember]] | SkippedSample]:
    """Yield (key, {extension: bytes}) for each sample of a shard, or a SkippedSample where the tar is broken.

    Members of one sample are consecutive (webdataset convention). After a read error the rest of the shard
    is unreliable, so reading stops there with one SkippedSample naming the last key. A sample with a member
    over `max_member_bytes` is one SkippedSample; that member's size is read from its header and its bytes
    are never read (a sparse member can declare gigabytes in a few blocks). While `skip_bodies()` is true (a
    resume fast-forwarding), members other than the captions are kept as TarMember references, not read:
    tarfile seeks from header to header.
    """
    key: str | None = None
    members: dict[str, bytes | TarMember] = {}
    refused: SkippedSample | None = None  # why the current sample is skipped
    try:
        archive = tarfile.open(path, "r:")
    except FileNotFoundError:
        yield SkippedSample(path, "", "missing shard: file not found")
        return
    except (tarfile.TarError, OSError) as err:
        yield SkippedSample(path, "", f"unreadable tar: {err}")
        return
    with archive:
        try:
            for info in archive:
                if not info.isfile():
                    continue
                member_key, ext = split_member_name(info.name)
                if member_key != key:
                    if key is not None:
                        yield refused or (key, members)
                    key, members, refused = member_key, {}, None
                if info.size > max_member_bytes:
                    refused = SkippedSample(path, key, f"too large: member {info.name} is {info.size} bytes, over the "
                                                       f"limit max_image_bytes={max_member_bytes} (not read)")
                    continue
                if ext not in CAPTION_EXTENSIONS and skip_bodies is not None and skip_bodies():
                    members[ext] = TarMember(path, info.offset_data, info.size)
                    continue
                handle = archive.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
            complete = _ends_with_end_block(path, archive.offset)
        except (tarfile.TarError, OSError, EOFError) as err:
            yield SkippedSample(path, key or "", f"truncated tar: {err} (rest of the shard skipped)")
            return
    if not complete:
        # tarfile stops quietly at a cut-off or garbled header; a sound tar ends with a zero block there.
        yield SkippedSample(path, key or "", f"truncated tar: no end-of-archive block after byte {archive.offset} "
                                            "(the last sample and the rest of the shard are skipped)")
        return
    if key is not None:
        yield refused or (key, members)


def _ends_with_end_block(path: str, offset: int) -> bool:
    """Whether the 512-byte block at `offset` is a whole end-of-archive (all-zero) block."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        block = handle.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def sample_caption(members: dict[str, bytes]) -> str | None:
    """The caption: `.json`'s "caption" (what the original reads), else the `.txt`. None when neither exists.

    Raises:
        ValueError: "bad json: ..." / "bad txt: ..." when the member cannot be decoded.
    """
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"bad json: {err}") from err
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"]
    if "txt" in members:
        try:
            return members["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"bad txt: {err}") from err
    return None


def tar_sample(
    shard: str, key: str, members: dict[str, bytes | TarMember], caption_processor: Callable[[str], str] | None,
    seed: int,
) -> Candidate | SkippedSample:
    """Check one tar sample's members and caption; the image itself is decoded later, when batched."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        return SkippedSample(shard, key, f"no image: no member .{'/.'.join(IMAGE_EXTENSIONS)}")
    try:
        caption = sample_caption(members)
    except ValueError as err:
        return SkippedSample(shard, key, str(err))
    if caption is None:
        return SkippedSample(shard, key, "no caption: neither .json 'caption' nor .txt")
    text = caption_processor(caption) if caption_processor else caption.strip()
    if not text.strip():
        return SkippedSample(shard, key, "empty caption")
    return Candidate(source=shard, key=key, image=members[image_ext], text=text, seed=seed)


class ShardSource:
    """One stage-1 dataset: its shards, split over slots, reshuffled each pass, through a shuffle buffer.

    Split: with at least as many shards as slots, each slot reads whole shards (shards[slot::num_slots] of
    the pass's shard order); with fewer, every slot reads every shard and keeps every num_slots-th sample.
    Either way no sample goes to two slots in one pass. The shuffle buffer is emptied at the end of each
    pass, so each pass of a slot is a permutation of its share.
    """

    def __init__(
        self,
        spec: ShardSpec,
        index: int,
        *,
        seed: int,
        shuffle_buffer: int,
        caption_processor: Callable[[str], str] | None,
        max_image_bytes: int = MAX_IMAGE_BYTES,
    ) -> None:
        self.spec = spec if isinstance(spec, str) else "::".join(map(str, spec))
        self.name = self.spec
        self.index = index
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.caption_processor = caption_processor
        self.max_image_bytes = max_image_bytes
        self.shards = expand_shards(spec)
        remote = [path for path in self.shards if "://" in path or path.startswith("pipe:")]
        if remote:
            raise ValueError(f"data source {spec!r} names remote shards ({remote[0]}); only local files are read: "
                             "copy or mount the shards and give their local path")
        if not self.shards:
            raise FileNotFoundError(f"data source {spec!r} names no shard; give a brace pattern, a folder or paths")
        present = [path for path in self.shards if Path(path).is_file()]
        if not present:
            raise FileNotFoundError(
                f"none of the {len(self.shards)} shards of {spec!r} exists (first: {self.shards[0]}); check the path"
            )
        if len(present) < len(self.shards):
            logger.warning("%d of %d shards of %s are missing; they are skipped", len(self.shards) - len(present),
                           len(self.shards), spec)

    def items(self, slot: int, num_slots: int, skip: int = 0) -> Iterator[StreamItem]:
        emitted = 0
        # Samples read while fast-forwarding keep their image unread (a TarMember); the few of them still in
        # the shuffle buffer when the skip ends are read when they are batched.
        for item in self._stream(slot, num_slots, fast_forwarding=lambda: emitted < skip):
            if emitted >= skip:
                yield item
            emitted += 1

    def _stream(self, slot: int, num_slots: int, fast_forwarding: Callable[[], bool]) -> Iterator[StreamItem]:
        """The slot's items, pass after pass: through the shuffle buffer, then a PassEnd (batches carry over)."""
        buffer_rng = random.Random(stable_seed("buffer", self.seed, self.index, slot))
        for epoch in count():
            buffer: list[Candidate] = []
            for item in self._pass_items(epoch, slot, num_slots, fast_forwarding):
                if isinstance(item, SkippedSample) or self.shuffle_buffer <= 1:
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    # Swap a random entry to the end and pop it: O(1), and the buffer order stays seeded.
                    pick = buffer_rng.randrange(len(buffer))
                    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                    yield buffer.pop()
            buffer_rng.shuffle(buffer)
            yield from buffer
            yield PassEnd(drop_partial=False)

    def one_pass(self) -> Iterator[Candidate | SkippedSample]:
        """Every sample once, skips included: pass 0 as one reader sees it (what the feature cache stores)."""
        return self._pass_items(0, 0, 1)

    def _pass_items(self, epoch: int, slot: int, num_slots: int,
                    skip_bodies: Callable[[], bool] | None = None) -> Iterator[Candidate | SkippedSample]:
        """This slot's share of pass `epoch`, in shard order (before the shuffle buffer)."""
        order = list(self.shards)
        random.Random(stable_seed("shards", self.seed, self.index, epoch)).shuffle(order)
        by_shard = len(order) >= num_slots
        ordinal = 0  # sample counter over the pass, for the per-sample split
        for position, shard in enumerate(order):
            if by_shard and position % num_slots != slot:
                continue
            for entry in read_tar_groups(shard, self.max_image_bytes, skip_bodies):
                if isinstance(entry, SkippedSample):
                    # In per-sample mode every slot reads every shard: one slot reports a shard's problems.
                    if by_shard or position % num_slots == slot:
                        yield entry
                    continue
                ordinal += 1
                if not by_shard and (ordinal - 1) % num_slots != slot:
                    continue
                key, members = entry
                seed = stable_seed("sample", self.seed, self.index, epoch, Path(shard).name, key)
                yield tar_sample(shard, key, members, self.caption_processor, seed)


def stage1_batches(
    sources: Sequence[tuple[ShardSpec, float]],
    transform: ImageTransform,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    process_captions: bool = True,
    start_batch: int = 0,
    positions: dict[str, int] | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Iterator[dict]:
    """An endless stream of stage-1 batches, each drawn whole from one dataset picked by ratio.

    Args:
        sources: (shard spec, mixing ratio) per dataset, e.g. [("/d/laion/{00000..10488}.tar", 115.0)]; a spec is
            a brace pattern, several joined by "::", a folder of .tar files, or a list of those.
        transform: PIL image -> (3, H, W) tensor (its randomness is seeded per sample).
        batch_size: samples per batch (per rank).
        seed: everything random (shard order, shuffle buffer, dataset picks, augmentations) derives from it.
        rank, world_size: this process's share; ranks never read the same sample in a pass.
        num_workers: DataLoader worker processes per dataset (0 = read in this process).
        shuffle_buffer: samples held for shuffling (<= 1: no shuffling beyond the shard order).
        process_captions: apply `blip_caption` (lower-case, strip punctuation, 50 words) as the original.
        start_batch: skip the first batches, yielding what the run from 0 would have yielded from here.
        positions: the merged "position" entries of the batches before `start_batch` (a checkpoint keeps them):
            the readers fast-forward there without decoding images, and the stream continues exactly.
        max_image_bytes: a sample with a bigger tar member is skipped (counted) without reading that member.
    """
    check_layout(batch_size, rank, world_size, num_workers, start_batch)
    if not sources:
        raise ValueError("sources is empty; give at least one (shard spec, ratio) pair")
    for spec, ratio in sources:
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"the mixing ratio of {spec!r} must be a positive number, got {ratio!r}")
    processor = process_caption if process_captions else None
    datasets = [
        ShardSource(spec, index, seed=seed, shuffle_buffer=shuffle_buffer, caption_processor=processor,
                    max_image_bytes=max_image_bytes)
        for index, (spec, _) in enumerate(sources)
    ]
    return _mixed(datasets, [float(r) for _, r in sources], transform, batch_size, seed=seed, rank=rank,
                  world_size=world_size, num_workers=num_workers, start_batch=start_batch, positions=positions)


def _mixed(
    datasets: list[ShardSource],
    ratios: list[float],
    transform: ImageTransform,
    batch_size: int,
    *,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    start_batch: int,
    positions: dict[str, int] | None,
) -> Iterator[dict]:
    # The original picks the dataset of each batch with random.choices on a generator seeded by seed + rank.
    picker = random.Random(stable_seed("mix", seed, rank))
    choices = range(len(datasets))
    consumed = [0] * len(datasets)
    for _ in range(start_batch):
        consumed[picker.choices(choices, weights=ratios)[0]] += 1
    streams = [
        rank_batches(SlotBatches(dataset, transform, batch_size, rank=rank, world_size=world_size,
                                 num_workers=num_workers, start_batch=consumed[i], positions=positions))
        for i, dataset in enumerate(datasets)
    ]
    while True:
        yield next(streams[picker.choices(choices, weights=ratios)[0]])
