"""Image loading and the two BLIP-2 image transforms MiniGPT-4 uses."""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from minigpt4.config import DataConfig

# CLIP's normalisation, which BLIP-2 and MiniGPT-4 use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageTransform = Callable[[Image.Image], torch.Tensor]
T = TypeVar("T")

# Decoding a truncated file must fail, not return a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image that cannot be used: not a regular file, unreadable, truncated, not an image, or over a limit."""


class ImageTooLarge(ImageError):
    """An image over a size limit (bytes, pixels or JPEG scans), refused before the work that limit guards."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white; 16/32-bit greys are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")  # 2-D uint8 -> mode L
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# Defaults for images read from local files and tar members (chat, caption, demo, training, feature cache).
MAX_IMAGE_BYTES: int = DataConfig.max_image_bytes  # 64 MiB
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own bomb threshold (~89 megapixels)
# libjpeg decodes every scan of a progressive JPEG over the whole image: a 94 KB file of 1000 scans over
# 4000x4000 pixels takes 19 s. Encoders write 10 (libjpeg) to about 20 (mozjpeg) scans.
MAX_JPEG_SCANS = 100

# A JPEG marker: 0xFF, any 0xFF fill bytes, then a byte that is neither 0x00 (a stuffed 0xFF) nor 0xFF.
_JPEG_MARKER = re.compile(rb"\xff+([\x01-\xfe])")
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 stand alone; every other marker has a length
_SOS, _EOI = 0xDA, 0xD9


def count_jpeg_scans(data: bytes, limit: int) -> int:
    """Start-of-scan markers in the first image of a JPEG, counted up to `limit + 1`.

    Segments with a length (APPn, DQT, ...) are skipped whole, so the SOS of an embedded EXIF thumbnail is
    not counted; entropy-coded data and any garbage are searched for markers, as libjpeg's reader does.
    Written by hand because Pillow and libjpeg expose no scan count or scan limit.
    """
    scans, position = 0, 2  # after SOI
    while scans <= limit:
        found = _JPEG_MARKER.search(data, position)
        if found is None:
            break
        marker, position = found.group(1)[0], found.end()
        if marker == _EOI:
            break
        if marker in _JPEG_NO_LENGTH or marker == 0xD8:
            continue
        scans += marker == _SOS
        position += int.from_bytes(data[position:position + 2], "big")
    return scans


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "an unusual file"


def check_image_file(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES, name: str | None = None) -> int:
    """The size of `path` if it is a regular file of at most `max_bytes`, from `stat` alone (nothing is read).

    Raises:
        FileNotFoundError: there is nothing at `path`.
        ImageError: a directory, FIFO, device or socket (reading one would block or never end), or no access.
        ImageTooLarge: over `max_bytes`.
    """
    label = name or str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as err:  # no permission, a file used as a folder in the path, a name too long
        raise ImageError(f"cannot read image {label}: {err.strerror or err}") from err
    return _checked_size(info, label, max_bytes)


def _checked_size(info: os.stat_result, label: str, max_bytes: int) -> int:
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"image {label} is {_file_kind(info.st_mode)}, not a regular file; give an image file")
    if info.st_size > max_bytes:
        raise ImageTooLarge(f"image {label} is {info.st_size} bytes, over the limit max_image_bytes={max_bytes}; "
                            "re-encode or shrink it, or raise the limit")
    return info.st_size


def read_image_file(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES, name: str | None = None) -> bytes:
    """The bytes of an image file: regular files only, at most `max_bytes`, checked before anything is read.

    Raises as `check_image_file`, and ImageError when the file cannot be read.
    """
    label = name or str(path)
    check_image_file(path, max_bytes, label)
    try:
        # O_NONBLOCK: if the path became a FIFO since the stat, opening it must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as handle:
            size = _checked_size(os.fstat(fd), label, max_bytes)  # the file that was opened, not the one stat saw
            data = handle.read(size + 1)  # one byte more shows a file that grew since
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ImageError(f"cannot read image {label}: {err.strerror or err}") from err
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image {label} grew past the limit max_image_bytes={max_bytes} while being read")
    return data


def load_image(
    source: str | Path | bytes | Image.Image,
    name: str | None = None,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Open and fully decode an image as upright RGB: the one loading function every reader uses.

    Each limit is checked before the work it guards: bytes before reading (a path: regular files only),
    width x height from the header and the JPEG scan count before decoding pixels. The EXIF orientation
    is applied, as image viewers do (a portrait phone photo is stored sideways with orientation 6 or 8).

    Args:
        source: a path, the encoded bytes, or a PIL image.
        name: how to call the image in errors (defaults to the path).
        max_bytes: the largest file read (`max_image_bytes`); bytes in hand were limited by their reader.
        max_pixels: the largest width x height (`max_image_pixels`).
        formats: the Pillow formats accepted (None: any Pillow reads).

    Raises:
        FileNotFoundError: a path with nothing there.
        ImageError: naming the image, when it is not a regular file, unreadable, truncated or not an image;
            ImageTooLarge when it is over a limit.
    """
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    data = read_image_file(source, max_bytes, label) if isinstance(source, (str, Path)) else source
    if not data:
        raise ImageError(f"cannot read image {label}: it is empty (0 bytes)")
    names = [{"WEBP": "WebP"}.get(f, f) for f in formats or ()]
    kinds = f"{', '.join(names[:-1])} or {names[-1]} image" if len(names) > 1 else "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `max_pixels` below decides
            image = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except Image.DecompressionBombError as err:
        # Pillow's own bomb check fires while reading the header, before ours can see the size.
        raise ImageTooLarge(f"image {label}: the header declares far more pixels than the limit "
                            f"max_image_pixels={max_pixels} ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read image {label}: not a readable {kinds} ({err})") from err
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageError(f"cannot read image {label}: it has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLarge(f"image {label} is {width}x{height} = {width * height} pixels, over the limit "
                                f"max_image_pixels={max_pixels}")
        if image.format in ("JPEG", "MPO") and count_jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
            raise ImageTooLarge(f"image {label} is a JPEG of more than {MAX_JPEG_SCANS} scans, which can take minutes "
                                "to decode; re-encode it (baseline, or a standard progressive JPEG)")
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as err:
            raise ImageError(f"cannot read image {label}: the {image.format} data is truncated or corrupt "
                             f"({err})") from err
        return to_rgb(image)


def load_batch(
    items: Sequence[T], image_of: Callable[[T], tuple[str | Path | bytes, str]], transform: ImageTransform
) -> tuple[list[T], list[torch.Tensor], list[str]]:
    """(the items whose image loaded, their transformed pixels, the errors of the others) for batched inference.

    `image_of(item)` gives the image source and its name in errors. An unreadable image drops its item, so a
    batch goes on without it and the caller counts the error (caption and eval skip such samples).
    """
    good: list[T] = []
    pixels: list[torch.Tensor] = []
    errors: list[str] = []
    for item in items:
        source, name = image_of(item)
        try:
            pixels.append(transform(load_image(source, name=name)))
            good.append(item)
        except (ImageError, FileNotFoundError) as err:
            errors.append(str(err))
    return good, pixels, errors


def eval_transform(image_size: int = 224) -> ImageTransform:
    """`blip2_image_eval`: square bicubic resize (aspect ratio not kept), to tensor, CLIP mean/std."""
    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def train_transform(image_size: int = 224, min_scale: float = 0.5, max_scale: float = 1.0) -> ImageTransform:
    """`blip2_image_train`: random resized crop (scale 0.5-1.0, bicubic), to tensor, CLIP mean/std."""
    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.RandomResizedCrop(
                image_size, scale=(min_scale, max_scale), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
