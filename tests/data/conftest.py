"""Builders for tiny stage-1 shards and stage-2 aligned folders, from real photos and synthetic images."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from minigpt4.processing.image import eval_transform

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photo(name: str, size: int = 48) -> Image.Image:
    """A real scikit-image photo, shrunk so tests stay fast."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size))


def synthetic(index: int, size: int = 24) -> Image.Image:
    """A distinct synthetic image per index (a colour gradient)."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    red = np.full((size, size), (index * 37) % 256, np.float32)
    array = np.stack([red, np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1))], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    """samples: dicts of webdataset members ({"__key__", "jpg", "json", "txt", ...}); values bytes/str."""
    with TarWriter(str(path), mtime=0) as writer:
        for sample in samples:
            writer.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})


def good_sample(key: str, index: int) -> dict:
    """An img2dataset-like sample; every 5th one is a real photo."""
    image = photo(PHOTOS[index % len(PHOTOS)]) if index % 5 == 0 else synthetic(index)
    caption = f"Picture {key}: a Test Image."
    return {"__key__": key, "jpg": encode(image), "json": json.dumps({"caption": caption, "key": key}),
            "txt": caption}


def make_dataset(folder: Path, name: str, shards: int, per_shard: int) -> str:
    """`shards` shards of `per_shard` good samples; keys are "<name>-<shard>-<index>". Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        samples = [good_sample(f"{name}-{shard:02d}-{i:03d}", shard * per_shard + i) for i in range(per_shard)]
        write_shard(folder / f"{shard:05d}.tar", samples)
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def make_aligned(root: Path, count: int) -> Path:
    """A cc_sbu_align folder with `count` good pairs (image ids "1".."count"), raw multi-sentence captions."""
    (root / "image").mkdir(parents=True, exist_ok=True)
    annotations = []
    for index in range(1, count + 1):
        image = photo(PHOTOS[index % len(PHOTOS)]) if index % 4 == 0 else synthetic(index)
        image.save(root / "image" / f"{index}.jpg")
        annotations.append({"image_id": str(index), "caption": f"The image shows Item {index}. It is, indeed, NICE!"})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return root


@pytest.fixture
def transform():
    return eval_transform(8)


def take(stream, count: int) -> list[dict]:
    return [next(stream) for _ in range(count)]


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the code under test spins")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def positions_before(batches: list[dict]) -> dict[str, int]:
    """What a checkpoint written after `batches` records: the latest position of every reader."""
    merged: dict[str, int] = {}
    for batch in batches:
        merged.update(batch["position"])
    return merged


def same_batches(first: list[dict], second: list[dict]) -> bool:
    return all(
        a["key"] == b["key"] and a["text"] == b["text"] and a["skipped"] == b["skipped"]
        and torch.equal(a["image"], b["image"])
        for a, b in zip(first, second, strict=True)
    )
