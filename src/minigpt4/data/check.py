"""Validation behind `minigpt4 data check`: read every sample the way training would and list what is broken."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minigpt4.data import SkippedSample
from minigpt4.data.aligned import ANNOTATION_FILE, IMAGE_DIR, AlignedSource
from minigpt4.data.pipeline import Candidate, decode
from minigpt4.data.webdataset import expand_shards, read_tar_groups, tar_sample
from minigpt4.processing.text import process_caption


@dataclass
class CheckReport:
    """What `check_path` found in one path."""

    path: str
    kind: str  # "shards" or "aligned"
    ok: int = 0
    broken: list[SkippedSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # oddities that are not errors


def _decode(candidate: Candidate, report: CheckReport) -> None:
    result = decode(candidate)
    if isinstance(result, SkippedSample):
        report.broken.append(result)
    else:
        report.ok += 1


def check_shards(spec: str) -> CheckReport:
    """Every sample of every shard of `spec` (brace pattern, `::` list, folder or one .tar)."""
    report = CheckReport(spec, "shards")
    shards = expand_shards(spec)
    if not shards:
        report.broken.append(SkippedSample(spec, "", "no shard: the path names no .tar file"))
    keys: set[str] = set()
    duplicates = 0
    for shard in shards:
        for entry in read_tar_groups(shard):
            if isinstance(entry, SkippedSample):
                report.broken.append(entry)
                continue
            key, members = entry
            duplicates += key in keys
            keys.add(key)
            item = tar_sample(shard, key, members, process_caption, seed=0)
            if isinstance(item, SkippedSample):
                report.broken.append(item)
            else:
                _decode(item, report)
    report.notes.append(f"{len(shards)} shard(s)")
    if duplicates:
        report.notes.append(f"{duplicates} key(s) appear more than once")
    return report


def check_aligned(root: str | Path) -> CheckReport:
    """Every annotation of a cc_sbu_align folder: caption present and non-empty, image present and decodable."""
    report = CheckReport(str(root), "aligned")
    try:
        source = AlignedSource(root, seed=0)
    except (FileNotFoundError, ValueError) as err:
        report.broken.append(SkippedSample(str(Path(root) / ANNOTATION_FILE), "", f"bad annotation file: {err}"))
        return report
    for index in range(len(source.annotations)):
        item = source.annotation_item(index, epoch=0)
        if isinstance(item, SkippedSample):
            report.broken.append(item)
        else:
            _decode(item, report)
    listed = {image_id for image_id, _ in source.annotations}
    unlisted = [p for p in (Path(root) / IMAGE_DIR).glob("*.jpg") if p.stem not in listed]
    report.notes.append(f"{len(source.annotations)} annotation(s)")
    if unlisted:
        report.notes.append(f"{len(unlisted)} image(s) in {IMAGE_DIR}/ have no annotation (unused)")
    return report


def check_path(path: str) -> CheckReport:
    """An aligned folder (it holds filter_cap.json) or shards (anything else)."""
    if (Path(path) / ANNOTATION_FILE).is_file():
        return check_aligned(path)
    return check_shards(path)
