"""The server driven by the official `openai` package over real HTTP on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from minigpt4.chat.generation import Completion, GenerationSettings
from minigpt4.chat.templates import Message
from minigpt4.serve.config import ServeConfig
from minigpt4.serve.images import load_image_url

from .conftest import data_url, image_message, running_server

QUESTION = "Describe this image in detail."


@pytest.fixture(scope="module")
def base_url(serve_engine):
    with running_server(serve_engine, ServeConfig(model_name="minigpt4-tiny", batch_wait_ms=5)) as url:
        yield url


@pytest.fixture
def client(base_url):
    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client


def direct(engine, messages: list[Message], images=(), max_new_tokens: int = 12) -> Completion:
    """The same greedy answer computed in-process, without HTTP."""
    prompt = engine.template.render(messages, None)
    return engine.generate([prompt], [list(images)], GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False))[0]


def test_plain_answer(client, serve_engine):
    response = client.chat.completions.create(
        model="minigpt4-tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    expected = direct(serve_engine, [Message("user", QUESTION)])
    assert response.object == "chat.completion"
    assert response.model == "minigpt4-tiny"
    assert len(response.choices) == 1
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_streamed_answer(client):
    stream = client.chat.completions.create(
        model="minigpt4-tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 1
    plain = client.chat.completions.create(
        model="minigpt4-tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    # The usage of the stream is that of the same request unstreamed.
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert finishes[0] == plain.choices[0].finish_reason
    assert "".join(content) == plain.choices[0].message.content


def test_image_answer(client, serve_engine, photo):
    url = data_url(photo.resize((96, 64)))
    response = client.chat.completions.create(
        model="minigpt4-tiny", messages=[image_message(url, QUESTION)], max_tokens=12, temperature=0
    )
    pixels = serve_engine.pixels(load_image_url(url, "image", "p", ServeConfig()))
    expected = direct(serve_engine, [Message("user", QUESTION, images=1)], [pixels])
    assert response.choices[0].message.content == expected.text
    # The image's query tokens are counted: the same text without the image is shorter by at least that.
    text_only = client.chat.completions.create(
        model="minigpt4-tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=1, temperature=0
    )
    assert response.usage.prompt_tokens >= text_only.usage.prompt_tokens + serve_engine.model.num_image_tokens


def test_image_formats_and_conversation(client, photo):
    """JPEG and WebP too, a system message and an earlier turn: all accepted."""
    small = photo.resize((64, 48))
    messages = [
        {"role": "system", "content": "You describe pictures."},
        image_message(data_url(small, "JPEG"), "What is this?"),
        {"role": "assistant", "content": "A cat."},
        image_message(data_url(small, "WEBP"), "And this one?"),
    ]
    response = client.chat.completions.create(model="minigpt4-tiny", messages=messages, max_tokens=4, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_sampling_n_and_seed(client):
    kwargs = dict(model="minigpt4-tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
                  temperature=1.0, top_p=0.9, seed=1234)
    first = client.chat.completions.create(n=1, **kwargs)
    again = client.chat.completions.create(n=1, **kwargs)
    assert first.choices[0].message.content == again.choices[0].message.content  # seeded: reproducible
    several = client.chat.completions.create(n=3, **{**kwargs, "seed": None})
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.usage.prompt_tokens == first.usage.prompt_tokens  # counted once, as OpenAI does
    assert 3 <= several.usage.completion_tokens <= 3 * 8


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == ["minigpt4-tiny"]
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["model"] == "minigpt4-tiny"
