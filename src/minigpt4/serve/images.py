"""Turning an `image_url` into a decoded RGB image, with every limit checked before the work it guards.

Order of checks for a `data:` URL: media type, encoded length (before base64 decoding), then
`load_image`'s: decoded length, container format, width x height from the header and the JPEG scan
count (before any pixel is decoded), then the full decode (truncated or corrupt files fail here) and
the EXIF orientation. Remote http(s) URLs are fetched only when the
operator enabled them, and never more than `max_image_bytes` are read.
"""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from minigpt4.processing.image import ImageError, ImageTooLarge, load_image
from minigpt4.serve.config import ServeConfig
from minigpt4.serve.errors import APIError

# PIL format name -> the media types a data URL may declare for it.
FORMATS = {"PNG": ("image/png",), "JPEG": ("image/jpeg", "image/jpg"), "WEBP": ("image/webp",)}
MEDIA_TYPES = {media for medias in FORMATS.values() for media in medias}


def _bad(label: str, param: str, message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{label}: {message}", param=param, code=code)


def _too_many_bytes(label: str, param: str, size: int, limit: int) -> APIError:
    return _bad(
        label, param, f"{size} bytes exceeds the limit max_image_bytes={limit}; send a smaller or re-encoded image",
        code="image_too_large",
    )


def decode_data_url(url: str, label: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise _bad(label, param, "a data URL needs a comma between its header and its data")
    fields = header[len("data:"):].split(";")
    media = fields[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise _bad(
            label, param, f"the data URL's media type {media or '(none)'!r} is not an image this server reads; "
            "send image/png, image/jpeg or image/webp", code="unsupported_image_type",
        )
    if "base64" not in (f.strip().lower() for f in fields[1:]):
        raise _bad(label, param, "the data URL must be base64 encoded (data:image/png;base64,...)")
    payload = "".join(payload.split())  # tolerate line-wrapped base64
    # 4 base64 characters carry 3 bytes: refuse oversize images before decoding anything.
    estimate = len(payload) // 4 * 3 - payload[-2:].count("=")
    if estimate > max_bytes:
        raise _too_many_bytes(label, param, estimate, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(label, param, f"the data URL is not valid base64 ({err})") from None
    return data


def fetch_remote(url: str, label: str, param: str, max_bytes: int, timeout_s: float) -> bytes:
    """Download an http(s) image, reading at most `max_bytes` (+1 to notice an oversize body)."""
    import httpx

    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=3) as client:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _bad(label, param, f"fetching {url} answered HTTP {response.status_code}", code="image_fetch_failed")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise _too_many_bytes(label, param, int(declared), max_bytes)
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_many_bytes(label, param, size, max_bytes)
                    chunks.append(chunk)
    except httpx.HTTPError as err:
        raise _bad(label, param, f"cannot fetch {url}: {err}", code="image_fetch_failed") from None
    return b"".join(chunks)


def decode_image(data: bytes, label: str, param: str, config: ServeConfig) -> Image.Image:
    """Bytes -> upright RGB image through the one loading function, its errors as APIError 400."""
    try:
        # "image 0 (messages.0...)" -> "0 (messages.0...)": load_image's messages say "image" themselves.
        return load_image(data, name=label.removeprefix("image "), max_bytes=config.max_image_bytes,
                          max_pixels=config.max_image_pixels, formats=list(FORMATS))
    except ImageTooLarge as err:
        raise APIError(400, str(err), param=param, code="image_too_large") from None
    except ImageError as err:
        raise APIError(400, str(err), param=param, code="invalid_image") from None


def load_image_url(url: str, label: str, param: str, config: ServeConfig) -> Image.Image:
    """An `image_url.url` (data: URL, or http(s) when enabled) -> RGB image, or APIError 400."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, label, param, config.max_image_bytes)
    elif scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise _bad(
                label, param, "remote image URLs are disabled on this server; send the image inline as a "
                "data:image/...;base64 URL (the operator can enable them with --allow-remote-images)",
                code="remote_images_disabled",
            )
        data = fetch_remote(url, label, param, config.max_image_bytes, config.remote_image_timeout_s)
    else:
        raise _bad(label, param, f"unsupported URL scheme {scheme or '(none)'!r}; use a data:image/...;base64 URL")
    return decode_image(data, label, param, config)
