"""A real server on a real 127.0.0.1 port, in a background thread, with the tiny model."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from PIL import Image

from minigpt4.serve.api import create_app
from minigpt4.serve.config import ServeConfig
from minigpt4.serve.engine import ModelEngine
from minigpt4.serve.transport import server_config


@pytest.fixture(scope="session")
def serve_engine(tiny_llm_dir) -> ModelEngine:
    """The tiny model (seeded, so answers are the same every run) with the vicuna_v0 template."""
    from minigpt4.config import model_preset
    from minigpt4.model.build import build_model

    cfg = model_preset("tiny")
    cfg.llm.path = str(tiny_llm_dir)
    torch.manual_seed(0)
    return ModelEngine(build_model(cfg), template="vicuna_v0")


@contextlib.contextmanager
def running_server(engine: ModelEngine, config: ServeConfig) -> Iterator[str]:
    """Serve `create_app(engine, config)` as `serve` does (same uvicorn settings and connection gate) on a
    free loopback port; yields the base URL ('http://127.0.0.1:P')."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(engine, config), config, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    media = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{media};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_message(url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def wait_for(condition, timeout_s: float = 60.0) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes (a hang guard, not a timing claim)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Debian's Chromium driven by Playwright (never `playwright install`); no background traffic off the machine.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]


@pytest.fixture
def browser():
    """A headless Chromium for one test."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (scripts/install.sh does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
