"""Settings of the HTTP server: network, limits on what a request may ask for, and batching."""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "MINIGPT4_API_KEY"


@dataclass
class ServeConfig:
    """Everything `minigpt4 serve` can be told besides the model.

    Every limit is enforced before the work it guards: body size while reading, image bytes before
    decoding base64, image pixels from the header before decoding pixels, images before any image
    is decoded, prompt tokens and max_tokens before the request is queued.
    """

    host: str = "127.0.0.1"  # loopback only unless the operator says otherwise
    port: int = 8000
    api_key: str = ""  # empty: no key required
    model_name: str = "minigpt4"  # the id /v1/models lists and responses carry
    template: str = "vicuna_v0"  # conversation template (minigpt4.chat.templates)
    system_prompt: str = ""  # empty: the template's own default
    # Remote http(s) image URLs make the server fetch arbitrary addresses (SSRF), so they are opt-in.
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0

    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 25_000_000  # width * height, read from the header
    max_images: int = 4  # per request
    max_prompt_tokens: int = 1536  # including the image positions
    max_context: int = 2000  # prompt + answer tokens (the original chat's max_length)
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 300  # when the request does not say (the original demo's value)
    max_n: int = 4  # choices per request (n), each one batch row

    max_batch_size: int = 8  # rows per model call
    batch_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # waiting requests; more are answered 429 with Retry-After

    def check(self) -> None:
        """Fail early on settings that cannot work, naming the field."""
        positive = (
            "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_prompt_tokens", "max_context", "max_tokens",
            "default_max_tokens", "max_n", "max_batch_size", "max_queue",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_images < 0:
            raise ValueError(f"serve.max_images must be 0 or more, got {self.max_images}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"serve.batch_wait_ms must be 0 or more, got {self.batch_wait_ms}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"serve.default_max_tokens={self.default_max_tokens} exceeds serve.max_tokens={self.max_tokens}"
            )
        if self.max_n > self.max_batch_size:
            raise ValueError(f"serve.max_n={self.max_n} exceeds serve.max_batch_size={self.max_batch_size}")
