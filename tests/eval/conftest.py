"""Tiny task files in the official layouts, over two real photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def coco_images(photo, tmp_path) -> Path:
    """A COCO-style image folder: images 1 and 2 under their 2014 names, image 3 under its 2017 name."""
    folder = tmp_path / "val2014"
    folder.mkdir()
    photo.save(folder / "COCO_val2014_000000000001.jpg")
    photo.rotate(90, expand=True).save(folder / "COCO_val2014_000000000002.jpg")
    photo.transpose(0).save(folder / "000000000003.jpg")
    return folder


@pytest.fixture
def coco_captions(tmp_path) -> Path:
    """captions_val2014.json's layout: images [{id, file_name, ...}] and annotations [{id, image_id, caption}]."""
    return write_json(tmp_path / "captions_val2014.json", {
        "info": {"description": "tiny"}, "licenses": [],
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 300, "width": 451},
                   {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": 451, "width": 300}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A cat looking at the camera."},
                        {"id": 11, "image_id": 2, "caption": "A cat lying on its side."},
                        {"id": 12, "image_id": 1, "caption": "An orange cat with green eyes."}],
    })
