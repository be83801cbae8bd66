"""Settings of the HTTP server: network, limits on what a request may ask for, and batching."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

API_KEY_ENV = "MINIGPT4_API_KEY"
_ORIGIN = re.compile(r"https?://[a-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9a-f:.]+\](:[0-9]{1,5})?")


def _opt(
    default: Any, text: str, *, low: float | None = None, high: float | None = None, above: float | None = None,
    flag: str = "",
) -> Any:
    """A field with its command-line help (`minigpt4 serve --help` lists every one) and, for numbers, the
    range `ServeConfig.check` enforces: low <= value <= high, or value > above (None: no bound)."""
    return field(default=default, metadata={"help": text, "low": low, "high": high, "above": above, "flag": flag})


@dataclass
class ServeConfig:
    """Everything `minigpt4 serve` can be told besides the model.

    Every limit is enforced before the work it guards: connections before they are read, the request
    head within a deadline, the body's declared size before reading it and its actual size while
    reading, image bytes before decoding base64, image pixels from the header before decoding pixels,
    images before any image is decoded, prompt tokens and max_tokens before the request is queued.
    """

    host: str = _opt("127.0.0.1", "address to bind; loopback only unless you open it on purpose")
    port: int = _opt(8000, "TCP port", low=1, high=65535)
    api_key: str = _opt("", "require 'Authorization: Bearer KEY' on /v1 (empty: no key)")
    model_name: str = _opt("minigpt4", "the model id that /v1/models lists and requests must name")
    template: str = _opt("", "conversation template, e.g. vicuna_v0 or llama2 (empty: the one the model records)")
    system_prompt: str = _opt("", "system text when a request has none (empty: the model's or template's default)")
    # Browsers send Origin on cross-site requests; none is allowed unless listed (a web page the user
    # visits must not be able to use a local server).
    cors_origins: tuple[str, ...] = _opt(
        (), "allow requests from web pages at this origin, e.g. http://localhost:3000 (repeatable; default: none)",
        flag="--cors-origin",
    )
    # Remote URLs make the server fetch any address it can reach (SSRF), so they are opt-in.
    allow_remote_images: bool = _opt(False, "also fetch http(s) image URLs (off: only data: URLs)")
    remote_image_timeout_s: float = _opt(10.0, "wall time for fetching a remote image, redirects and body included",
                                         low=0.1, high=3600)
    remote_image_max_redirects: int = _opt(3, "redirects a remote image fetch follows (each target checked)",
                                           low=0, high=20)
    # Private, loopback, link-local, multicast and reserved addresses are never fetched unless listed here.
    remote_image_allowed_networks: tuple[str, ...] = _opt(
        (), "also fetch remote images from this network although it is not public, e.g. 10.1.0.0/16 "
        "(repeatable; default: public addresses only)", flag="--remote-image-allowed-network",
    )

    # Connections: what one client and all clients can hold, and for how long.
    max_connections: int = _opt(
        512, "open connections; at the cap a new one closes the longest-idle one, or gets 503 if none is idle",
        low=1, high=1_000_000,
    )
    max_connections_per_client: int = _opt(
        64, "open connections from one client address (same rule; behind a proxy set it to max_connections)",
        low=1, high=1_000_000,
    )
    request_head_timeout_s: float = _opt(
        10.0, "seconds a connection may take to send a complete request head (from connect or the last answer)",
        low=0.1, high=3600,
    )
    request_body_timeout_s: float = _opt(60.0, "seconds a client may take to send a request body", low=0.1,
                                         high=3600)
    keep_alive_timeout_s: float = _opt(5.0, "seconds an idle keep-alive connection stays open", low=0.1, high=3600)
    max_header_bytes: int = _opt(16 * 1024, "bytes of an unfinished request head the server buffers; past it: 400",
                                 low=1024, high=1024 * 1024)

    max_body_bytes: int = _opt(24 * 1024 * 1024, "largest request body", low=1)
    max_buffered_body_bytes: int = _opt(
        96 * 1024 * 1024, "request body bytes all requests together may hold until their images are decoded "
        "(past it: 503)",
        low=1,
    )
    max_image_bytes: int = _opt(10 * 1024 * 1024, "largest encoded image", low=1)
    max_image_pixels: int = _opt(25_000_000, "largest width x height, read from the header before decoding", low=1)
    max_images: int = _opt(4, "images per request", low=0)
    max_prompt_tokens: int = _opt(1536, "prompt tokens per request, image positions included", low=1)
    max_context: int = _opt(2000, "prompt + answer tokens (the original chat's max_length)", low=1)
    max_tokens: int = _opt(1024, "the largest max_tokens a request may ask for", low=1)
    default_max_tokens: int = _opt(300, "max_tokens when a request does not say (the original demo's value)", low=1)
    max_n: int = _opt(4, "choices per request (n); each is one batch row", low=1)
    max_messages: int = _opt(512, "messages per request, each content part counted as one (checked before rendering)",
                             low=1)
    max_generation_seconds: float = _opt(300.0, "wall time one generation may take; then it ends with "
                                         "finish_reason 'length'", above=0)

    max_batch_size: int = _opt(8, "rows per model call", low=1)
    batch_wait_ms: float = _opt(10.0, "how long the first request of a batch waits for company", low=0, high=60_000)
    max_queue: int = _opt(64, "waiting requests; more are answered 429 with Retry-After", low=1)

    def check(self) -> None:
        """Fail early on settings that cannot work, naming the field: every value has its field's type,
        every number is finite and in its range, and the settings agree with each other."""
        for spec in fields(self):
            _check_value(spec.name, getattr(self, spec.name), spec.type, spec.metadata)
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"serve.default_max_tokens={self.default_max_tokens} exceeds serve.max_tokens={self.max_tokens}"
            )
        from minigpt4.chat.templates import TEMPLATE_NAMES

        if self.template and self.template not in TEMPLATE_NAMES:
            raise ValueError(f"serve.template={self.template!r} is not one of {', '.join(TEMPLATE_NAMES)}")
        if self.max_n > self.max_batch_size:
            raise ValueError(f"serve.max_n={self.max_n} exceeds serve.max_batch_size={self.max_batch_size}")
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(f"serve.max_connections_per_client={self.max_connections_per_client} exceeds "
                             f"serve.max_connections={self.max_connections}; lower it too")
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(f"serve.max_buffered_body_bytes={self.max_buffered_body_bytes} is below "
                             f"serve.max_body_bytes={self.max_body_bytes}: a body of the allowed size could never "
                             "be read; raise it")
        for network in self.remote_image_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"serve.remote_image_allowed_networks: {network!r} is not a network; write an "
                                 "address or ADDRESS/PREFIX, e.g. 10.1.0.0/16 or 127.0.0.1") from None
        for origin in self.cors_origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"serve.cors_origins: {origin!r} is not an origin; write scheme://host[:port] in lower case, "
                    "without a path or trailing slash, e.g. http://localhost:3000"
                )


def _check_value(name: str, value: Any, kind: str, meta: Any) -> None:
    """One field: its declared type (`kind` is the annotation's text), then finite and within its range."""
    expected = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "tuple[str, ...]": (tuple,)}
    ok = isinstance(value, expected[kind]) and (kind == "bool" or not isinstance(value, bool))
    if kind == "tuple[str, ...]":
        ok = ok and all(isinstance(item, str) for item in value)
    if not ok:
        raise ValueError(f"serve.{name} must be of type {kind}, got {value!r}")
    if kind not in ("int", "float"):
        return
    low, high, above = meta["low"], meta["high"], meta["above"]
    if (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above)):
        return
    if above is not None:
        bounds = f" > {above}"
    elif low is not None and high is not None:
        bounds = f" between {low} and {high}"
    elif low is not None:
        bounds = f" of at least {low}"
    else:
        bounds = f" of at most {high}" if high is not None else ""
    raise ValueError(f"serve.{name} must be {'an integer' if kind == 'int' else 'a finite number'}{bounds}, "
                     f"got {value}")
