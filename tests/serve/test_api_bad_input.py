"""Hostile and broken requests: each is a 4xx in OpenAI's error shape naming the problem, and the
server stays healthy and keeps answering afterwards."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from minigpt4.serve.config import ServeConfig

from .conftest import data_url, running_server

KEY = "test-key-0123456789"
MODEL = "minigpt4-tiny"
LIMITS = ServeConfig(
    model_name=MODEL, api_key=KEY, max_body_bytes=256 * 1024, max_image_bytes=64 * 1024,
    max_image_pixels=1_000_000, max_images=4, max_prompt_tokens=200, max_tokens=64, default_max_tokens=16,
    batch_wait_ms=2,
)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def base_url(serve_engine):
    with running_server(serve_engine, LIMITS) as url:
        yield url


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client
        # Whatever the test sent, the server is still up and answers.
        assert client.get("/health").status_code == 200


def ask(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def post(http: httpx.Client, body, headers=AUTH) -> httpx.Response:
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    return http.post("/v1/chat/completions", content=body, headers={**headers, "Content-Type": "application/json"})


def expect_error(response: httpx.Response, status: int, *phrases: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for phrase in phrases:
        assert phrase in error["message"], error["message"]
    return error


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but carries one compressed row (~100 bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 16)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def b64_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def noise_png(size: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# ---------------------------------------------------------------- malformed requests


@pytest.mark.parametrize("body", [b'{"model": "minigpt4-tiny", "messages": [', b"not json at all", b"\xff\xfe\x00"])
def test_malformed_json(http, body):
    error = expect_error(post(http, body), 400, "not valid JSON")
    assert error["type"] == "invalid_request_error"


def test_empty_body(http):
    expect_error(post(http, b""), 400, "body is empty")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": MODEL, "messages": "hello"}, "messages"),
        (ask("hi", max_tokens="10"), "max_tokens"),
        (ask("hi", temperature="hot"), "temperature"),
        (ask(5), "messages.0.content"),
        (ask([{"type": "text", "text": 3}]), "messages.0.content.0.text"),
        (ask([{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]), "messages.0.content.0.image_url"),
        (ask([{"type": "video", "url": "x"}]), "messages.0.content.0"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (ask("hi", stop=[1, 2]), "stop.0"),
        (ask("hi", n=0), "n"),
        (ask("hi", temperature=3.5), "temperature"),
        (ask("hi", seed=10**23), "seed"),
        ([1, 2, 3], "body"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        # Not finite (json.dumps writes NaN/Infinity; 1e999 parses to inf) or out of OpenAI's range.
        (ask("hi", temperature=float("nan")), "temperature"),
        (ask("hi", temperature=-0.5), "temperature"),
        (ask("hi", top_p=float("inf")), "top_p"),
        (ask("hi", top_p=0.0), "top_p"),
        (ask("hi", presence_penalty=float("nan")), "presence_penalty"),
        (ask("hi", frequency_penalty=float("-inf")), "frequency_penalty"),
        (ask("hi", presence_penalty=7.0), "presence_penalty"),
        (ask("hi", logit_bias={"5": float("inf")}), "logit_bias.5"),
        (ask("hi", top_logprobs=-1), "top_logprobs"),
        (ask("hi", max_tokens=0), "max_tokens"),
        (ask("hi", max_tokens=-3), "max_tokens"),
        (ask("hi", max_completion_tokens=0), "max_completion_tokens"),
        (ask("hi", n=-1), "n"),
        (ask("hi", seed=-(2**64)), "seed"),
        (ask("hi", stop=["a", "b", "c", "d", "e"]), "stop"),
        (ask("hi", stop=""), "stop"),
        (ask("hi", stop=["ok", "x" * 65]), "stop.1"),
    ],
)
def test_wrong_types(http, body, field):
    error = expect_error(post(http, body), 400)
    assert error["message"].startswith(field + ":") or f"; {field}:" in error["message"], error["message"]


def test_overflowing_number_literal_is_refused(http):
    """1e999 is valid JSON that parses to infinity: refused, naming the field."""
    body = json.dumps(ask("hi")).replace('"max_tokens": 4', '"max_tokens": 4, "temperature": 1e999').encode()
    error = expect_error(post(http, body), 400, "finite number")
    assert error["message"].startswith("temperature:")


@pytest.mark.parametrize(
    "body, status, phrase",
    [
        ({**ask("hi"), "model": "gpt-4"}, 404, "is not served here"),
        (ask("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools is not supported"),
        (ask("hi", max_tokens=65), 400, "max_tokens=64"),
        (ask("hi", max_completion_tokens=10**30), 400, "max_completion_tokens=1000000000000000000000000000000 exceeds"),
        (ask("hi", n=10**30), 400, "max_n="),
        (ask([{"type": "text", "text": "hi"}] * 600), 400, "601 messages and content parts"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 513}, 400, "max_messages=512"),
        (ask("word " * 400), 400, "max_prompt_tokens=200"),
        (ask("y" * 200_000), 400, "takes at least"),  # refused without tokenizing 200 kB
        (ask("hi", n=9), 400, "max_n="),
        (ask("hi", n=2, stream=True), 400, "cannot be streamed"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "start with a user message"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
         400, "last message must come from the user"),
        (ask("what is <ImageHere> here"), 400, "image placeholder"),
    ],
)
def test_requests_beyond_limits(http, body, status, phrase):
    expect_error(post(http, body), status, phrase)


def test_mutated_requests_never_5xx(http):
    """120 seeded random mutations of a valid request (values swapped for odd types, keys dropped):
    every answer is a 200 or a 4xx, never a server error."""
    rng = np.random.default_rng(7)
    odd = [None, True, -1, 0, 2**70, -(2**70), 1e308, -0.0, "", "x" * 300, "\u0000\ufffd\U0001F600", [], [None], {},
           {"type": "text"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, 3.5, "###", [1, "a"]]
    base = {**ask([{"type": "text", "text": "hi"}]), "temperature": 0.7, "top_p": 0.5, "stop": ["###"], "seed": 3, "n": 1}
    statuses = []
    for _ in range(120):
        body = json.loads(json.dumps(base))
        for _ in range(int(rng.integers(1, 4))):
            key = list(body)[int(rng.integers(len(body)))]
            where = rng.integers(3)
            if where == 0:
                body.pop(key)
            elif where == 1 or key != "messages":
                body[key] = odd[int(rng.integers(len(odd)))]
            else:
                message = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
                field, value = ["role", "content"][int(rng.integers(2))], odd[int(rng.integers(len(odd)))]
                body["messages"] = [{**message, field: value}]
        response = post(http, body)
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            assert response.json()["error"]["message"]
    assert any(400 <= s < 500 for s in statuses) and 200 in statuses


# ---------------------------------------------------------------- images


def test_truncated_png(http, photo):
    whole = base64.b64decode(data_url(photo.resize((64, 64))).split(",", 1)[1])
    cut = whole[: len(whole) // 2]
    expect_error(post(http, ask([image_part(b64_url(cut)), {"type": "text", "text": "hi"}])), 400,
                 "image 0", "truncated or corrupt")


def test_zero_byte_image(http):
    expect_error(post(http, ask([image_part("data:image/png;base64,")])), 400, "empty (0 bytes)")


def test_decompression_bomb_20000x20000(http):
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 200  # the header claims 400M pixels; the request is tiny
    error = expect_error(post(http, ask([image_part(b64_url(bomb))])), 400, "max_image_pixels=1000000")
    assert error["code"] == "image_too_large"


def test_too_many_pixels_from_header(http):
    # 3000x3000 is below Pillow's own bomb check: the server's header check must catch it.
    expect_error(post(http, ask([image_part(b64_url(png_header_only(3000, 3000)))])), 400,
                 "3000x3000", "max_image_pixels=1000000")


def test_too_many_image_bytes(http):
    big = noise_png(160)  # ~77 KB of incompressible pixels
    assert len(big) > LIMITS.max_image_bytes
    expect_error(post(http, ask([image_part(b64_url(big))])), 400, "max_image_bytes=65536")


@pytest.mark.parametrize(
    "url, phrase",
    [
        (b64_url(b"hello, I am plain text", "text/plain"), "media type 'text/plain'"),
        (b64_url(b"%PDF-1.4 not an image at all", "application/pdf"), "media type 'application/pdf'"),
        (b64_url(b"GIF89a but really just text"), "not a readable PNG, JPEG or WebP"),
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("https://example.com/cat.png", "remote image URLs are disabled"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ],
)
def test_non_image_urls(http, url, phrase):
    expect_error(post(http, ask([image_part(url)])), 400, phrase)


def test_gif_is_refused_even_when_labelled_png(http):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "GIF")
    expect_error(post(http, ask([image_part(b64_url(buffer.getvalue()))])), 400, "not a readable PNG, JPEG or WebP")


def test_fifty_images(http):
    tiny = data_url(Image.new("RGB", (4, 4), "blue"))
    error = expect_error(post(http, ask([image_part(tiny)] * 50 + [{"type": "text", "text": "hi"}])), 400,
                         "50 images", "max_images=4")
    assert error["code"] == "too_many_images"


def test_image_in_assistant_message(http, photo):
    url = data_url(photo.resize((16, 16)))
    body = {"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [image_part(url)]},
        {"role": "user", "content": "and?"}]}
    expect_error(post(http, body), 400, "only user messages may carry images")


# ---------------------------------------------------------------- size and authentication


def test_oversized_body(http):
    body = json.dumps(ask("x" * (LIMITS.max_body_bytes + 1000))).encode()
    error = expect_error(post(http, body), 413, "max_body_bytes=262144")
    assert error["code"] == "request_too_large"


def test_oversized_chunked_body(http):
    """Without a Content-Length the server counts while reading and stops at the limit."""
    chunks = [b'{"model": "minigpt4-tiny", "messages": [{"role": "user", "content": "'] + [b"x" * 65536] * 8 + [b'"}]}']
    response = http.post("/v1/chat/completions", content=iter(chunks),
                         headers={**AUTH, "Content-Type": "application/json"})
    expect_error(response, 413, "max_body_bytes")


@pytest.mark.parametrize(
    "headers, phrase",
    [({}, "missing API key"), ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
     ({"Authorization": KEY}, "missing API key"), ({"Authorization": f"Bearer {KEY}x"}, "invalid API key")],
)
def test_api_key(http, headers, phrase):
    error = expect_error(post(http, ask("hi"), headers=headers), 401, phrase)
    assert error["type"] == "authentication_error"
    assert http.get("/v1/models", headers=headers).status_code == 401


def test_unknown_route_and_method(http):
    expect_error(http.get("/v1/nothing", headers=AUTH), 404)
    expect_error(http.get("/v1/chat/completions", headers=AUTH), 405)


def test_still_answers_after_everything(http, photo):
    """After the bad requests above (same server), a good one with an image is answered."""
    response = post(http, {**ask([image_part(data_url(photo.resize((32, 32)))), {"type": "text", "text": "hi"}]),
                           "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------- remote images (operator opt-in)


@pytest.fixture(scope="module")
def image_host(photo):
    """A loopback HTTP server with a small photo, an oversize PNG and nothing else."""
    import http.server
    import socketserver

    buffer = io.BytesIO()
    photo.resize((48, 32)).save(buffer, "PNG")
    files = {"/cat.png": buffer.getvalue(), "/big.png": noise_png(160)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args) -> None:
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}", files
        server.shutdown()


def test_remote_images_when_enabled(serve_engine, image_host):
    host, files = image_host
    config = ServeConfig(model_name=MODEL, allow_remote_images=True, max_image_bytes=64 * 1024, batch_wait_ms=2,
                         remote_image_allowed_networks=("127.0.0.1",))  # loopback is refused by default
    with running_server(serve_engine, config) as url, httpx.Client(base_url=url, timeout=60) as http:
        fetched = post(http, {**ask([image_part(f"{host}/cat.png")]), "temperature": 0})
        inline = post(http, {**ask([image_part(b64_url(files["/cat.png"]))]), "temperature": 0})
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"] == inline.json()["choices"]
        expect_error(post(http, ask([image_part(f"{host}/big.png")])), 400, "max_image_bytes=65536")
        expect_error(post(http, ask([image_part(f"{host}/missing.png")])), 400, "answered HTTP 404")
        assert http.get("/health").status_code == 200
