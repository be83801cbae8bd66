"""Image loading and the two BLIP-2 image transforms MiniGPT-4 uses."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision import transforms
from torchvision.transforms import InterpolationMode

# CLIP's normalisation, which BLIP-2 and MiniGPT-4 use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageTransform = Callable[[Image.Image], torch.Tensor]


class ImageError(ValueError):
    """An image that cannot be decoded: unreadable, truncated or not an image at all."""


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


def load_image(source: str | Path | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """Open and fully decode an image as RGB.

    Args:
        source: a path, the encoded bytes, or a PIL image.
        name: how to call the image in errors (defaults to the path).

    Raises:
        ImageError: naming the image, when it is unreadable, truncated or not an image.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    try:
        if isinstance(source, (str, Path)):
            with Image.open(source) as image:
                image.load()
                return to_rgb(image)
        with Image.open(io.BytesIO(source)) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {label}: {err}") from err


# Decoding a truncated file must fail, not return a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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
