"""Settings of the HTTP server: network, limits on what a request may ask for, and batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

API_KEY_ENV = "MINIGPT4_API_KEY"


def _opt(default: Any, text: str) -> Any:
    """A field with its command-line help (`minigpt4 serve --help` lists every one)."""
    return field(default=default, metadata={"help": text})


@dataclass
class ServeConfig:
    """Everything `minigpt4 serve` can be told besides the model.

    Every limit is enforced before the work it guards: body size while reading, image bytes before
    decoding base64, image pixels from the header before decoding pixels, images before any image
    is decoded, prompt tokens and max_tokens before the request is queued.
    """

    host: str = _opt("127.0.0.1", "address to bind; loopback only unless you open it on purpose")
    port: int = _opt(8000, "TCP port")
    api_key: str = _opt("", "require 'Authorization: Bearer KEY' on /v1 (empty: no key)")
    model_name: str = _opt("minigpt4", "the model id that /v1/models lists and requests must name")
    template: str = _opt("vicuna_v0", "conversation template: vicuna_v0, llama2 or chat_template")
    system_prompt: str = _opt("", "system text when a request has none (empty: the template's default)")
    # Remote URLs make the server fetch any address it can reach (SSRF), so they are opt-in.
    allow_remote_images: bool = _opt(False, "also fetch http(s) image URLs (off: only data: URLs)")
    remote_image_timeout_s: float = _opt(10.0, "timeout for fetching a remote image")

    max_body_bytes: int = _opt(24 * 1024 * 1024, "largest request body")
    max_image_bytes: int = _opt(10 * 1024 * 1024, "largest encoded image")
    max_image_pixels: int = _opt(25_000_000, "largest width x height, read from the header before decoding")
    max_images: int = _opt(4, "images per request")
    max_prompt_tokens: int = _opt(1536, "prompt tokens per request, image positions included")
    max_context: int = _opt(2000, "prompt + answer tokens (the original chat's max_length)")
    max_tokens: int = _opt(1024, "the largest max_tokens a request may ask for")
    default_max_tokens: int = _opt(300, "max_tokens when a request does not say (the original demo's value)")
    max_n: int = _opt(4, "choices per request (n); each is one batch row")
    max_messages: int = _opt(512, "messages per request, each content part counted as one (checked before rendering)")
    max_generation_seconds: float = _opt(300.0, "wall time one generation may take; then it ends with "
                                         "finish_reason 'length'")

    max_batch_size: int = _opt(8, "rows per model call")
    batch_wait_ms: float = _opt(10.0, "how long the first request of a batch waits for company")
    max_queue: int = _opt(64, "waiting requests; more are answered 429 with Retry-After")

    def check(self) -> None:
        """Fail early on settings that cannot work, naming the field."""
        positive = (
            "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_prompt_tokens", "max_context", "max_tokens",
            "default_max_tokens", "max_n", "max_messages", "max_batch_size", "max_queue",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_images < 0:
            raise ValueError(f"serve.max_images must be 0 or more, got {self.max_images}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"serve.batch_wait_ms must be 0 or more, got {self.batch_wait_ms}")
        if not 0 < self.max_generation_seconds < float("inf"):  # also refuses NaN
            raise ValueError(
                f"serve.max_generation_seconds must be a finite number > 0, got {self.max_generation_seconds}"
            )
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"serve.default_max_tokens={self.default_max_tokens} exceeds serve.max_tokens={self.max_tokens}"
            )
        from minigpt4.chat.templates import TEMPLATE_NAMES

        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"serve.template={self.template!r} is not one of {', '.join(TEMPLATE_NAMES)}")
        if self.max_n > self.max_batch_size:
            raise ValueError(f"serve.max_n={self.max_n} exceeds serve.max_batch_size={self.max_batch_size}")
