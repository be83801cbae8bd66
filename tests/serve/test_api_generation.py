"""Between a parsed request and its answer: bounded cost, safe sampling settings, time limits and
client disconnects, over real HTTP on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from minigpt4.serve.config import ServeConfig
from minigpt4.serve.engine import to_conversation

from .conftest import running_server, wait_for

MODEL = "tiny"


@pytest.fixture(scope="module")
def base_url(serve_engine):
    # The default body limit (24 MiB), so that a body of 200k messages is read and parsed.
    with running_server(serve_engine, ServeConfig(model_name=MODEL, batch_wait_ms=2)) as url:
        yield url


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client
        assert client.get("/health").status_code == 200


def ask(text: str = "Describe the cat.", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def streamed(client: httpx.Client, body: dict) -> tuple[str, str | None, list[dict]]:
    """(joined content, finish_reason, every event) of a streamed request."""
    events = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert all("error" not in event for event in events), events
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    return content, (finishes[0] if finishes else None), events


# ---------------------------------------------------------------- cost bounded before work


def test_200k_messages_are_refused_before_any_rendering(http):
    """~6.7 MB of 200,000 one-word messages: refused on their count, not after merging and rendering them
    (hang guard: the client gives up after 60 s; before the fix this took about 30 s on a 2-core machine)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 200_000}).encode()
    start = time.monotonic()
    response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "200000 messages" in error["message"] and "max_messages=512" in error["message"]
    assert error["param"] == "messages" and error["code"] == "too_many_messages"
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "field, value, bound",
    [("stop", [1] * 1_000_000, "at most 4 items"), ("tools", [1] * 1_000_000, "at most 128 items"),
     ("functions", [[]] * 1_000_000, "at most 128 items"),
     ("logit_bias", {str(i): "x" for i in range(300_000)}, "at most 1024 items, got 300000")],
)
def test_a_million_wrong_items_make_one_error(http, field, value, bound):
    """Lists and maps are bounded before their items are validated: one error, not one per item (a
    million errors took ~1 GB and 15 s to build and describe)."""
    body = json.dumps({**ask(), field: value}).encode()
    response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"{field}:") and bound in message and "more)" not in message, message


def test_merging_consecutive_messages_is_linear():
    """400,000 user messages in a row merge into one in one pass (hang guard: repeated concatenation
    took minutes here; the linear merge takes well under a second)."""
    turns = [("user", "hi", 0)] * 400_000
    start = time.monotonic()
    conversation = to_conversation(turns, None)
    assert time.monotonic() - start < 30
    assert len(conversation.messages) == 1 and conversation.messages[0].text == "\n".join(["hi"] * 400_000)


# ---------------------------------------------------------------- sampling settings


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 5e-324])
def test_tiny_temperature_decodes_greedily(http, temperature):
    """A positive temperature so small that logits / T overflows float32 answers as greedy decoding,
    streamed and not (it used to fail on NaN probabilities, after the stream had started)."""
    greedy = http.post("/v1/chat/completions", json=ask(temperature=0)).json()["choices"][0]
    plain = http.post("/v1/chat/completions", json=ask(temperature=temperature))
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"] == greedy["message"]
    assert plain.json()["choices"][0]["finish_reason"] == greedy["finish_reason"]
    content, finish, _ = streamed(http, ask(temperature=temperature))
    assert content == greedy["message"]["content"] and finish == greedy["finish_reason"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_max_generation_seconds_is_checked(value):
    with pytest.raises(ValueError, match="serve.max_generation_seconds must be a finite number > 0"):
        ServeConfig(max_generation_seconds=value).check()


# ---------------------------------------------------------------- wall-time limit


def test_generation_wall_time_limit_ends_with_length(serve_engine):
    """--max-generation-seconds: past it, the answer ends with what it has and finish_reason "length"
    (the limit is checked after each token, so at least one token is always produced)."""
    config = ServeConfig(model_name=MODEL, batch_wait_ms=2, max_generation_seconds=1e-9)
    with running_server(serve_engine, config) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = ask("Tell me everything.", max_tokens=500, temperature=0)
        plain = client.post("/v1/chat/completions", json=body).json()
        assert plain["choices"][0]["finish_reason"] == "length"
        assert plain["usage"]["completion_tokens"] == 1
        content, finish, events = streamed(client, {**body, "stream_options": {"include_usage": True}})
        assert finish == "length" and content == plain["choices"][0]["message"]["content"]
        assert events[-1]["usage"]["completion_tokens"] == 1


# ---------------------------------------------------------------- clients that leave



@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_generation(serve_engine, stream):
    """The client sends a request for 1800 tokens (which the tiny model does produce: no stop string
    comes) and closes its connection once generation is under way; the row stops soon after, plain or
    streamed, instead of running to its end."""
    config = ServeConfig(model_name=MODEL, batch_wait_ms=2, max_tokens=1850, max_context=2000)
    body = json.dumps(ask("Tell me everything.", max_tokens=1800, temperature=0, stream=stream)).encode()
    calls: list[int] = []
    hook = serve_engine.model.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        with running_server(serve_engine, config) as url:
            health = lambda: httpx.get(f"{url}/health").json()  # noqa: E731
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                               + body)
                assert wait_for(lambda: len(calls) >= 10)  # generating
            assert wait_for(lambda: health()["running"] == 0)
            stats = health()
            assert stats["cancelled"] == 1 and stats["rows"] == 1
            assert len(calls) < 1800  # stopped, not run to max_tokens
    finally:
        hook.remove()
