"""Turning an `image_url` into a decoded RGB image, with every limit checked before the work it guards.

Order of checks for a `data:` URL: media type, encoded length (before base64 decoding), then
`load_image`'s: decoded length, container format, width x height from the header and the JPEG scan
count (before any pixel is decoded), then the full decode (truncated or corrupt files fail here) and
the EXIF orientation. Remote http(s) URLs are fetched only when the operator enabled them, by
`RemoteImages` on the event loop before preparation, from public addresses only, never reading more
than `max_image_bytes`, all within `remote_image_timeout_s`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from urllib.parse import urljoin

import httpx
from PIL import Image

from minigpt4.processing.image import ImageError, ImageTooLarge, load_image
from minigpt4.serve.config import ServeConfig
from minigpt4.serve.errors import APIError
from minigpt4.serve.schemas import ChatCompletionRequest, ImagePart

# PIL format name -> the media types a data URL may declare for it.
FORMATS = {"PNG": ("image/png",), "JPEG": ("image/jpeg", "image/jpg"), "WEBP": ("image/webp",)}
MEDIA_TYPES = {media for medias in FORMATS.values() for media in medias}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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


# Remote fetches in flight across the server: each may hold up to max_image_bytes while it downloads.
_CONCURRENT_FETCHES = 16
_REDIRECTS = (301, 302, 303, 307, 308)


def address_problem(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why a remote image must not be fetched from `address` (None: it may).

    Only globally routable unicast addresses are fetched, unless `allowed` lists the address's network.
    IPv6 forms that embed an IPv4 address (mapped, 6to4, NAT64) are judged by that IPv4 address.
    """
    if any(address.version == net.version and address in net for net in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return address_problem(embedded, allowed)
    for kind in ("loopback", "link_local", "multicast", "reserved", "unspecified", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "not globally routable"


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class RemoteImages:
    """Fetches the http(s) image URLs of requests, when the operator enabled them.

    Fetching runs on the event loop (name resolution on a worker thread), so a slow image host holds no
    thread and no preparation slot: other requests go on. For each URL: one wall-time limit for the
    whole fetch (resolution, connection, redirects, body), every address the name resolves to checked
    against `address_problem` before connecting, the connection made to the checked address (so a
    second DNS answer cannot differ), every redirect target checked the same way, and the body read at
    most to max_image_bytes. httpx does the HTTP; the address check and redirects are ours because
    httpx resolves names and follows redirects inside the connection, where no check can run.
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.allowed = [ipaddress.ip_network(net, strict=False) for net in config.remote_image_allowed_networks]
        self.slots = asyncio.Semaphore(_CONCURRENT_FETCHES)

    async def fetch_request(self, request: ChatCompletionRequest) -> dict[str, bytes | APIError]:
        """url -> bytes, or the APIError to answer with, for each remote image of `request`.

        Nothing is fetched when remote images are off, or when preparation will refuse the request's
        images anyway (more than max_images, or an image outside a user message).
        """
        remote: dict[str, tuple[str, str]] = {}
        count, misplaced = 0, False
        for m, message in enumerate(request.messages):
            if isinstance(message.content, str):
                continue
            for p, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    param = f"messages.{m}.content.{p}.image_url.url"  # as `ChatService.prepare` names it
                    if part.image_url.url.split(":", 1)[0].lower() in ("http", "https"):
                        remote.setdefault(part.image_url.url, (f"image {count} ({param})", param))
                    count += 1
                    misplaced = misplaced or message.role != "user"
        if not self.config.allow_remote_images or not remote or misplaced or count > self.config.max_images:
            return {}
        results = await asyncio.gather(*(self.fetch(url, *where) for url, where in remote.items()),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, APIError):
                raise result
        return dict(zip(remote, results, strict=True))

    async def fetch(self, url: str, label: str, param: str) -> bytes:
        """The bytes of one remote image, within remote_image_timeout_s in all; APIError 400 otherwise."""
        limit = self.config.remote_image_timeout_s
        try:
            async with asyncio.timeout(limit):
                async with self.slots:
                    return await self._follow(url, label, param)
        except TimeoutError:
            raise _bad(label, param, f"fetching {url} did not finish within remote_image_timeout_s={limit} s",
                       code="image_fetch_failed") from None
        except httpx.HTTPError as err:
            raise _bad(label, param, f"cannot fetch {url}: {err}", code="image_fetch_failed") from None

    async def _follow(self, url: str, label: str, param: str) -> bytes:
        limit = self.config.remote_image_max_redirects
        target = url
        # No proxy from the environment (it would connect elsewhere); no keep-alive (each hop may be a new host).
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                     timeout=self.config.remote_image_timeout_s,
                                     limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for _ in range(limit + 1):
                body, location = await self._get(client, target, url, label, param)
                if location is None:
                    return body
                target = urljoin(target, location)
        raise _bad(label, param, f"fetching {url} was redirected more than remote_image_max_redirects={limit} times",
                   code="image_fetch_failed")

    async def _get(self, client: httpx.AsyncClient, target: str, url: str, label: str, param: str
                   ) -> tuple[bytes, str | None]:
        """One GET: (body, None), or (b"", location) for a redirect."""
        try:
            parsed = httpx.URL(target)
        except httpx.InvalidURL as err:
            raise _bad(label, param, f"fetching {url} reached an invalid URL {target!r} ({err})") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise _bad(label, param, f"fetching {url} reached {target!r}; only http(s) URLs with a host are fetched")
        addresses = await self._checked_addresses(parsed, url, label, param)
        extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        headers = {"Host": parsed.netloc.decode("ascii")}
        for number, address in enumerate(addresses):
            try:
                request = client.build_request("GET", parsed.copy_with(host=address), headers=headers,
                                               extensions=extensions)
                response = await client.send(request, stream=True)
                break
            except httpx.ConnectError:
                if number == len(addresses) - 1:
                    raise
        try:
            if response.status_code in _REDIRECTS and response.headers.get("location"):
                return b"", response.headers["location"]
            if response.status_code != 200:
                raise _bad(label, param, f"fetching {url} answered HTTP {response.status_code}",
                           code="image_fetch_failed")
            max_bytes = self.config.max_image_bytes
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_many_bytes(label, param, int(declared), max_bytes)
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():  # decoded: a compressed body counts at its real size
                size += len(chunk)
                if size > max_bytes:
                    raise _too_many_bytes(label, param, size, max_bytes)
                chunks.append(chunk)
            return b"".join(chunks), None
        finally:
            await response.aclose()

    async def _checked_addresses(self, parsed: httpx.URL, url: str, label: str, param: str) -> list[str]:
        """Every address `parsed.host` resolves to, each one allowed; refused if any is not."""
        host = parsed.host
        try:
            found = [ipaddress.ip_address(host)]
        except ValueError:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as err:
                raise _bad(label, param, f"fetching {url}: cannot resolve {host} ({err})",
                           code="image_fetch_failed") from None
            # An IPv6 address may carry a zone ("fe80::1%eth0"); the address itself is what is judged.
            found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        for address in found:
            problem = address_problem(address, self.allowed)
            if problem is not None:
                raise _bad(
                    label, param, f"fetching {url}: {host} is {address}, a {problem} address; remote images are "
                    "fetched from public addresses only (the operator can allow networks with "
                    "--remote-image-allowed-network)", code="image_fetch_forbidden",
                )
        return [str(address) for address in found]


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


def load_image_url(
    url: str, label: str, param: str, config: ServeConfig, fetched: Mapping[str, bytes | APIError] | None = None
) -> Image.Image:
    """An `image_url.url` (data: URL, or http(s) when enabled) -> RGB image, or APIError 400.

    `fetched` holds what `RemoteImages.fetch_request` fetched for this request (bytes or the error).
    """
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
        result = (fetched or {}).get(url)
        if result is None:
            raise RuntimeError(f"{url} was not fetched before decoding; call RemoteImages.fetch_request first")
        if isinstance(result, APIError):
            raise result
        data = result
    else:
        raise _bad(label, param, f"unsupported URL scheme {scheme or '(none)'!r}; use a data:image/...;base64 URL")
    return decode_image(data, label, param, config)
