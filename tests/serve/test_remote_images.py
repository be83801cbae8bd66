"""Remote images (`--allow-remote-images`): public addresses only, checked before connecting and after every
redirect, one wall-time limit for the whole fetch, a size limit while streaming, and a slow image host holds
up nobody else. Real HTTP servers on 127.0.0.1; loopback is allowed by the operator's setting, not by a mock."""

from __future__ import annotations

import asyncio
import http.server
import io
import ipaddress
import threading
import time

import httpx
import pytest
from PIL import Image

from minigpt4.serve.config import ServeConfig
from minigpt4.serve.errors import APIError
from minigpt4.serve.images import RemoteImages, address_problem, load_image_url

from .conftest import data_url, image_message, running_server

LOOPBACK = ("127.0.0.1",)


class ImageHost:
    """A threaded HTTP server on 127.0.0.1 with an image, redirects, a trickling body and an oversize one."""

    def __init__(self) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (24, 16), "orange").save(buffer, "PNG")
        self.image = buffer.getvalue()
        self.hits: list[tuple[str, str]] = []  # (path, Host header)
        self.stop = threading.Event()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits.append((self.path, self.headers.get("Host", "")))
                port = self.server.server_address[1]
                redirects = {"/loop": "/loop", "/hop": "/cat.png",
                             "/metadata": "http://169.254.169.254/latest/meta-data/",
                             "/other-loopback": f"http://127.0.0.2:{port}/cat.png"}
                if self.path in redirects:
                    self.send_response(302)
                    self.send_header("Location", redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/cat.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(host.image)))
                    self.end_headers()
                    self.wfile.write(host.image)
                elif self.path == "/trickle":  # one byte every 0.1 s: each read is quick, the whole never ends
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    while not host.stop.wait(0.1):
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                elif self.path == "/undeclared-big":  # no Content-Length: only counting while reading catches it
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(50):
                        self.wfile.write(b"\0" * 4096)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def image_host():
    host = ImageHost()
    yield host
    host.close()


def fetch(url: str, **settings) -> bytes:
    config = ServeConfig(allow_remote_images=True, **settings)
    return asyncio.run(RemoteImages(config).fetch(url, "image 0 (p)", "p"))


def refused(url: str, **settings) -> APIError:
    with pytest.raises(APIError) as caught:
        fetch(url, **settings)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("0.0.0.0", "unspecified"),
    ("100.64.0.1", "not globally routable"), ("::ffff:127.0.0.1", "loopback"), ("2002:a00:1::", "private"),
    ("64:ff9b::a9fe:a9fe", "link-local"), ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_only_public_unicast_addresses_are_fetched(address, problem):
    assert address_problem(ipaddress.ip_address(address)) == problem


def test_allowed_networks_lift_the_ban_for_those_networks_only():
    allowed = [ipaddress.ip_network("10.1.0.0/16")]
    assert address_problem(ipaddress.ip_address("10.1.2.3"), allowed) is None
    assert address_problem(ipaddress.ip_address("10.2.0.1"), allowed) == "private"
    with pytest.raises(ValueError, match="remote_image_allowed_networks: 'banana' is not a network"):
        ServeConfig(remote_image_allowed_networks=("banana",)).check()


@pytest.mark.parametrize("url, shown", [
    ("{host}/cat.png", "127.0.0.1, a loopback address"),
    ("http://localhost:{port}/cat.png", "a loopback address"),
    ("http://[::ffff:127.0.0.1]:{port}/cat.png", "a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local address"),
    ("http://10.0.0.1/cat.png", "10.0.0.1, a private address"),
])
def test_private_addresses_are_refused_before_connecting(image_host, url, shown):
    error = refused(url.format(host=image_host.url, port=image_host.port))
    assert error.code == "image_fetch_forbidden" and shown in error.message
    assert "--remote-image-allowed-network" in error.message
    assert image_host.hits == []  # nothing reached the host


def test_an_allowed_network_is_fetched_by_address_with_the_name_kept(image_host):
    assert fetch(f"{image_host.url}/cat.png", remote_image_allowed_networks=LOOPBACK) == image_host.image
    # A name: resolved once, every address checked, the connection made to a checked address, Host kept.
    by_name = fetch(f"http://localhost:{image_host.port}/cat.png", remote_image_allowed_networks=("127.0.0.1", "::1"))
    assert by_name == image_host.image
    assert image_host.hits[-1] == ("/cat.png", f"localhost:{image_host.port}")


def test_the_wall_time_limit_covers_the_whole_fetch(image_host):
    started = time.monotonic()
    error = refused(f"{image_host.url}/trickle", remote_image_allowed_networks=LOOPBACK, remote_image_timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert "did not finish within remote_image_timeout_s=1.0 s" in error.message
    assert elapsed < 5  # every single read is quick; only a limit on the whole fetch ends it


def test_redirects_are_followed_a_bounded_number_of_times(image_host):
    assert fetch(f"{image_host.url}/hop", remote_image_allowed_networks=LOOPBACK) == image_host.image
    image_host.hits.clear()
    error = refused(f"{image_host.url}/loop", remote_image_allowed_networks=LOOPBACK, remote_image_max_redirects=3)
    assert "redirected more than remote_image_max_redirects=3 times" in error.message
    assert [path for path, _ in image_host.hits] == ["/loop"] * 4


@pytest.mark.parametrize("path, shown", [
    ("/metadata", "169.254.169.254 is 169.254.169.254, a link-local address"),
    ("/other-loopback", "127.0.0.2 is 127.0.0.2, a loopback address"),  # loopback, but not the allowed network
])
def test_each_redirect_target_is_checked(image_host, path, shown):
    error = refused(f"{image_host.url}{path}", remote_image_allowed_networks=LOOPBACK)
    assert error.code == "image_fetch_forbidden" and shown in error.message
    assert [p for p, _ in image_host.hits] == [path]  # the target was never asked


def test_the_size_limit_applies_while_streaming(image_host):
    error = refused(f"{image_host.url}/undeclared-big", remote_image_allowed_networks=LOOPBACK,
                    max_image_bytes=64 * 1024)
    assert error.code == "image_too_large" and "max_image_bytes=65536" in error.message


def test_remote_urls_are_not_fetched_when_disabled_or_over_the_image_count(image_host):
    url = f"{image_host.url}/cat.png"
    with pytest.raises(APIError, match="remote image URLs are disabled"):
        load_image_url(url, "image 0 (p)", "p", ServeConfig(), fetched={})
    from minigpt4.serve.schemas import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [image_message(url, "hi")] * 3})
    assert asyncio.run(RemoteImages(ServeConfig()).fetch_request(request)) == {}
    capped = ServeConfig(allow_remote_images=True, remote_image_allowed_networks=LOOPBACK, max_images=2)
    assert asyncio.run(RemoteImages(capped).fetch_request(request)) == {}  # preparation refuses it unfetched
    assert image_host.hits == []


def test_a_slow_image_host_does_not_hold_up_other_requests(serve_engine, image_host):
    config = ServeConfig(model_name="tiny", allow_remote_images=True, remote_image_allowed_networks=LOOPBACK,
                         remote_image_timeout_s=8.0, batch_wait_ms=2)
    slow_body = {"model": "tiny", "max_tokens": 2,
                 "messages": [image_message(f"{image_host.url}/trickle", "what is this?")]}
    quick_body = {"model": "tiny", "max_tokens": 2, "temperature": 0,
                  "messages": [image_message(data_url(Image.new("RGB", (16, 16), "blue")), "and this?")]}
    with running_server(serve_engine, config) as url:
        slow_answers: list[httpx.Response] = []

        def post_slow() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                slow_answers.append(client.post("/v1/chat/completions", json=slow_body))

        # More slow fetches than the server has preparation slots (4).
        threads = [threading.Thread(target=post_slow, daemon=True) for _ in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while sum(path == "/trickle" for path, _ in image_host.hits) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(path == "/trickle" for path, _ in image_host.hits) == 6  # all six are being fetched now
        started = time.monotonic()
        with httpx.Client(base_url=url, timeout=60) as client:
            quick = client.post("/v1/chat/completions", json=quick_body)
        assert quick.status_code == 200, quick.text
        assert time.monotonic() - started < 5  # answered while the six fetches still trickle
        for thread in threads:
            thread.join(30)
    assert [answer.status_code for answer in slow_answers] == [400] * 6
    assert all("remote_image_timeout_s=8.0" in answer.json()["error"]["message"] for answer in slow_answers)
