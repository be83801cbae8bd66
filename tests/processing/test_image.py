"""Image transforms (numbers of the original) and decoding of every image mode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.processing.image import CLIP_MEAN, CLIP_STD, ImageError, eval_transform, load_image, train_transform


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
