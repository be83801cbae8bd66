"""The demo's upload checks: every bad file becomes a message, before any pixel is decoded."""

from __future__ import annotations

import struct
import zlib

import pytest

from minigpt4.processing.image import ImageError
from minigpt4.serve.gradio_app import DemoLimits, check_upload, write_examples


def _png_claiming(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_bad_uploads_are_named_errors(tmp_path, photo):
    limits = DemoLimits(max_file_bytes=200_000, max_pixels=1_000_000)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png is empty"):
        check_upload(empty, limits)
    large = tmp_path / "large.png"
    _png_claiming(large, 5_000, 5_000)
    with pytest.raises(ImageError, match="large.png is 5000x5000 pixels; the limit is 1 megapixels"):
        check_upload(large, limits)
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 20_000, 20_000)
    with pytest.raises(ImageError, match="bomb.png has too many pixels"):
        check_upload(bomb, limits)
    big = tmp_path / "big.bmp"
    photo.save(big)  # ~500 kB uncompressed
    with pytest.raises(ImageError, match="big.bmp is 0.4 MB; the limit is 0.2 MB"):
        check_upload(big, limits)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageError, match="notes.txt is not an image"):
        check_upload(text, limits)
    good = tmp_path / "ok.png"
    photo.save(good)
    assert check_upload(good, DemoLimits()).size == photo.size


def test_examples_are_real_photos(tmp_path):
    paths = write_examples(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["cat.png", "astronaut.png", "coffee.png", "rocket.png"]
    assert all(check_upload(p, DemoLimits()).size[0] >= 300 for p in paths)


def test_a_sideways_phone_photo_arrives_upright(tmp_path, sideways_jpeg):
    path = tmp_path / "portrait.jpg"
    path.write_bytes(sideways_jpeg(6))
    image = check_upload(path, DemoLimits())
    assert image.size == (20, 40) and image.getpixel((16, 20))[0] > 200  # the stored top (red) is on the right
