"""Image transforms (numbers of the original) and decoding of every image mode."""

from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_IMAGE_BYTES,
    ImageError,
    ImageTooLarge,
    count_jpeg_scans,
    eval_transform,
    load_image,
    read_image_file,
    train_transform,
)


def test_eval_transform_is_a_bicubic_square_resize_with_clip_normalisation(photo):
    out = eval_transform(224)(photo)
    assert out.shape == (3, 224, 224)
    resized = np.asarray(photo.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(
        CLIP_STD
    )[:, None, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_train_transform_crops_within_the_original_scale_range(photo):
    transform = train_transform(224)
    crop = transform.transforms[1]
    assert crop.scale == (0.5, 1.0) and crop.interpolation.value == "bicubic"
    torch.manual_seed(0)
    a, b = transform(photo), transform(photo)
    assert a.shape == b.shape == (3, 224, 224)
    assert not torch.equal(a, b)  # random crops differ


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(photo, mode):
    small = photo.resize((32, 24))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)  # 2-D uint16 -> I;16
    else:
        image = small.convert(mode)
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (32, 24)
    assert eval_transform(56)(image).shape == (3, 56, 56)
    if mode in ("I;16", "L"):  # the 16-bit grey keeps its contrast instead of saturating to white
        assert np.asarray(rgb).std() > 10


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_truncated_and_non_images_raise_an_error_naming_the_file(photo, tmp_path):
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(text)
    with pytest.raises(ImageError, match="upload.png"):
        load_image(b"", name="upload.png")


# ---------------------------------------------------------------- EXIF orientation, limits, file kinds


@pytest.mark.parametrize("orientation, left, right", [(6, "blue", "red"), (8, "red", "blue")])
def test_exif_orientation_is_applied(tmp_path, sideways_jpeg, orientation, left, right):
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    path = tmp_path / "portrait.jpg"
    path.write_bytes(sideways_jpeg(orientation))
    for source in (path, path.read_bytes(), Image.open(path)):
        image = load_image(source)
        assert image.size == (20, 40)  # upright: portrait
        # 6 = turn 90 degrees clockwise to view (the stored top goes right); 8 = counter-clockwise.
        for x, colour in ((3, left), (16, right)):
            assert np.abs(np.subtract(image.getpixel((x, 20)), colours[colour])).max() < 40, (source, x)


def slow_progressive_jpeg(scans: int, size: int = 2048) -> bytes:
    """A flat grey progressive JPEG whose last scan is repeated: few bytes per scan, but libjpeg walks every
    block of the image for each one."""
    buffer = io.BytesIO()
    Image.new("L", (size, size), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # the last SOS and its entropy-coded data, before EOI
    return data[:-2] + last_scan * scans + b"\xff\xd9"


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    # By hand, without the scan check: Pillow took 21.8 s to decode this 65 KB file (2048x2048, 3005 scans).
    data = slow_progressive_jpeg(3000)
    assert len(data) < 300_000 and count_jpeg_scans(data, 10_000) > 3000
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match="more than 100 scans"):
        load_image(data, name="scans.jpg")
    assert time.monotonic() - started < 5  # refused from the markers (the decode would take seconds)


def test_ordinary_progressive_jpegs_are_read(photo):
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", progressive=True)
    # libjpeg's standard progression (10 scans for colour), plus an EXIF thumbnail whose SOS is not counted.
    assert count_jpeg_scans(buffer.getvalue(), 100) == 10
    assert load_image(buffer.getvalue()).size == photo.size
    assert load_image(slow_progressive_jpeg(50, size=64)).size == (64, 64)  # a few extra scans are fine


def test_a_jpeg_in_an_exif_thumbnail_is_not_counted(photo):
    thumbnail = io.BytesIO()
    photo.resize((32, 24)).save(thumbnail, "JPEG", progressive=True)  # its own 10 scans
    exif = Image.Exif()
    exif[0x0112] = 1
    buffer = io.BytesIO()
    photo.resize((64, 48)).save(buffer, "JPEG", exif=exif.tobytes() + thumbnail.getvalue())
    assert count_jpeg_scans(buffer.getvalue(), 100) == 1


def test_a_file_over_the_byte_limit_is_refused_unread(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(2**31)  # 2 GiB, sparse: nothing is allocated on disk
    with pytest.raises(ImageTooLarge, match=f"{2**31} bytes, over the limit max_image_bytes={MAX_IMAGE_BYTES}"):
        load_image(huge)
    small = tmp_path / "small.jpg"
    small.write_bytes(b"x" * 101)
    with pytest.raises(ImageTooLarge, match="101 bytes, over the limit max_image_bytes=100"):
        load_image(small, max_bytes=100)


def in_thread(fn, timeout: float = 10.0):
    """fn() in a daemon thread; the error it raised, or a failure if it is still running after `timeout`."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "still reading after 10 s: the file was opened or read"
    return outcome[0]


@pytest.mark.parametrize("kind", ["device", "fifo", "directory"])
def test_devices_fifos_and_directories_are_refused_unread(tmp_path, kind):
    if kind == "device":
        path, phrase = Path("/dev/zero"), "is a device, not a regular file"
    elif kind == "fifo":
        path, phrase = tmp_path / "pipe.jpg", "is a FIFO (named pipe), not a regular file"
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    else:
        path, phrase = tmp_path / "folder.jpg", "is a directory, not a regular file"
        path.mkdir()
    error = in_thread(lambda: load_image(path))
    assert isinstance(error, ImageError) and phrase in str(error) and str(path) in str(error)
    assert "\n" not in str(error)
    with pytest.raises(ImageError, match=re.escape(phrase)):
        read_image_file(path)


def test_a_path_through_a_file_is_an_image_error_not_an_os_error(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ImageError, match="Not a directory"):
        load_image(tmp_path / "file" / "cat.jpg")
