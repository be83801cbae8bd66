"""Validation behind `minigpt4 data check`: read every sample the way training would and list what is broken."""

from __future__ import annotations

import multiprocessing
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from minigpt4.data import SkippedSample
from minigpt4.data.aligned import ANNOTATION_FILE, IMAGE_DIR, AlignedSource
from minigpt4.data.conversations import ConversationSource
from minigpt4.data.pipeline import decode
from minigpt4.data.webdataset import expand_shards, read_tar_groups, tar_sample
from minigpt4.processing.text import process_caption


@dataclass
class CheckReport:
    """What `check_path` found in one path."""

    path: str
    kind: str  # "shards", "aligned" or "conversations"
    ok: int = 0
    broken: list[SkippedSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # oddities that are not errors


def check_shard(shard: str) -> tuple[int, list[SkippedSample], int]:
    """(good samples, broken ones, keys repeated inside the shard) for one shard."""
    good, broken, seen, repeated = 0, [], set(), 0
    for entry in read_tar_groups(shard):
        if isinstance(entry, SkippedSample):
            broken.append(entry)
            continue
        key, members = entry
        # Members of a sample must be consecutive; a key seen again means a split sample.
        repeated += key in seen
        seen.add(key)
        item = tar_sample(shard, key, members, process_caption, seed=0)
        result = item if isinstance(item, SkippedSample) else decode(item)
        if isinstance(result, SkippedSample):
            broken.append(result)
        else:
            good += 1
    return good, broken, repeated


def check_shards(spec: str, workers: int = 1, progress: bool = False) -> CheckReport:
    """Every sample of every shard of `spec` (brace pattern, `::` list, folder or one .tar), on `workers` processes."""
    report = CheckReport(spec, "shards")
    shards = expand_shards(spec)
    if not shards:
        report.broken.append(SkippedSample(spec, "", "no shard: the path names no .tar file"))
    repeated = 0
    with ExitStack() as stack:
        results = map(check_shard, shards)
        if workers > 1 and len(shards) > 1:
            # fork: the children only read tars and decode with PIL, and re-importing torch per child is slow.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(multiprocessing.get_context(method).Pool(workers))
            results = pool.imap(check_shard, shards)  # imap keeps shard order, so the report is stable
        for good, broken, shard_repeated in tqdm(results, total=len(shards), desc=f"check {spec}", unit="shard",
                                                 disable=not progress, file=sys.stderr):
            report.ok += good
            report.broken.extend(broken)
            repeated += shard_repeated
    report.notes.append(f"{len(shards)} shard(s)")
    if repeated:
        report.notes.append(f"{repeated} key(s) appear twice in one shard, apart (members of a sample must be adjacent)")
    return report


def check_aligned(root: str | Path) -> CheckReport:
    """Every annotation of a cc_sbu_align folder: caption present and non-empty, image present and decodable."""
    report = CheckReport(str(root), "aligned")
    try:
        source = AlignedSource(root, seed=0)
    except (FileNotFoundError, ValueError) as err:
        report.broken.append(SkippedSample(str(Path(root) / ANNOTATION_FILE), "", f"bad annotation file: {err}"))
        return report
    _check_items(source, report)
    listed = {image_id for image_id, _ in source.annotations}
    unlisted = [p for p in (Path(root) / IMAGE_DIR).glob("*.jpg") if p.stem not in listed]
    report.notes.append(f"{len(source.annotations)} annotation(s)")
    if unlisted:
        report.notes.append(f"{len(unlisted)} image(s) in {IMAGE_DIR}/ have no annotation (unused)")
    return report


def _check_items(source: AlignedSource, report: CheckReport) -> None:
    """Read and decode every record of an aligned or conversation source, counting the good and listing the rest."""
    for index in range(len(source.annotations)):
        item = source.annotation_item(index, epoch=0)
        result = item if isinstance(item, SkippedSample) else decode(item)
        if isinstance(result, SkippedSample):
            report.broken.append(result)
        else:
            report.ok += 1


def check_conversations(path: str | Path) -> CheckReport:
    """Every record of a conversation file (LLaVA's layout): questions and answers in turn, image decodable."""
    report = CheckReport(str(path), "conversations")
    try:
        source = ConversationSource(path, seed=0)
    except (FileNotFoundError, ValueError) as err:
        report.broken.append(SkippedSample(str(path), "", f"bad conversation file: {err}"))
        return report
    _check_items(source, report)
    report.notes.append(f"{len(source.annotations)} conversation(s)")
    return report


def check_path(path: str, workers: int = 1, progress: bool = False) -> CheckReport:
    """An aligned folder (it holds filter_cap.json), a conversation file (a .json file) or shards (anything else).

    A path without a single usable sample (an empty tar, a folder of empty tars) is broken: training on it
    would have nothing to learn from.
    """
    if (Path(path) / ANNOTATION_FILE).is_file():
        report = check_aligned(path)
    elif Path(path).suffix == ".json" and Path(path).is_file():
        report = check_conversations(path)
    else:
        report = check_shards(path, workers, progress)
    if not report.ok:
        report.broken.append(SkippedSample(path, "", "no usable sample: training would have nothing to read here"))
    return report
