"""The Gradio demo in a real browser: headless Chromium (Debian's package) driven by Playwright.

The tiny model is made an exact bigram model whose answer to any vicuna_v0 prompt is
"a red image" followed by "###", so the page must show exactly that answer (stop string cut off).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minigpt4.chat import GenerationSettings
from minigpt4.testing import make_bigram

from .conftest import free_port

ANSWER_CHAIN = [":", "▁a", "▁red", "▁image", "###"]  # the prompt ends with "Assistant:"


@pytest.fixture
def demo_url(tiny_config, tmp_path):
    from minigpt4.model.build import build_model
    from minigpt4.serve.gradio_app import build_demo, launch

    torch.manual_seed(0)
    model = build_model(tiny_config)
    vocab = model.tokenizer.get_vocab()
    successor = {vocab[a]: vocab[b] for a, b in zip(ANSWER_CHAIN, ANSWER_CHAIN[1:], strict=False)}
    successor[vocab["###"]] = vocab["▁in"]
    make_bigram(model.llm, successor)
    demo = build_demo(model, GenerationSettings(do_sample=False, max_new_tokens=8), examples_dir=tmp_path / "examples")
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def page(browser):
    return browser.new_page()


def _upload(page, path: Path) -> None:
    page.locator("#upload input[type=file]").set_input_files(str(path))


def _status_contains(page, text: str) -> None:
    page.wait_for_function(
        "t => document.querySelector('#status').innerText.includes(t)", arg=text, timeout=30_000
    )


def test_demo_in_a_browser(demo_url, page, photo, tmp_path):
    page.goto(demo_url)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)

    # Bad uploads: a message in the page, and the server carries on.
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    _upload(page, notes)
    _status_contains(page, "notes.txt is not an image this demo can read")
    good = tmp_path / "cat.png"
    photo.save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    page.wait_for_selector("#upload input[type=file]", state="attached")
    _upload(page, truncated)
    _status_contains(page, "cannot read image cut.png")

    # A real photo, a question, and the streamed answer.
    page.wait_for_selector("#upload input[type=file]", state="attached")
    _upload(page, good)
    _status_contains(page, "Image received")
    page.locator("#question textarea").fill("What is in this picture?")
    page.locator("#question textarea").press("Enter")
    bot = page.locator("#chatbot [data-testid='bot']").last
    bot.wait_for(timeout=60_000)
    page.wait_for_function(
        "t => [...document.querySelectorAll(\"#chatbot [data-testid='bot']\")].some(e => e.innerText.trim() === t)",
        arg="a red image",
        timeout=60_000,
    )
    assert "###" not in page.locator("#chatbot").inner_text()

    # Restart clears the conversation; an example photo starts a new one.
    page.locator("#restart").click()
    _status_contains(page, "Conversation cleared")
    page.wait_for_function("() => document.querySelectorAll(\"#chatbot [data-testid='bot']\").length === 0")
    page.get_by_text("astronaut.png").first.click()
    _status_contains(page, "Image received")
    assert "[image: astronaut.png]" in page.locator("#chatbot").inner_text()
