"""Connection-level starvation: slow and idle connections cannot keep normal requests out.

A real uvicorn server (the transport `serve` uses) on 127.0.0.1 in a thread, with the tiny model.
The attacks are raw sockets driven from a thread; every test bounds its own duration. The timing
assertions are the hang guards the issue asks for ("answered 200 within 5 s"); run with -s to see
the measured latencies and what the server held.
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from minigpt4.serve.config import ServeConfig

from .conftest import running_server

MODEL = "tiny"
ATTACKERS = 300
NORMAL_WITHIN_S = 5.0
NORMAL = {"model": MODEL, "messages": [{"role": "user", "content": "Describe the cat."}], "max_tokens": 4,
          "temperature": 0}


@pytest.fixture(autouse=True, scope="module")
def enough_open_files():
    """Both ends of 300+ sockets live in this process: raise the soft open-files limit if it is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * ATTACKERS + 200:
        pytest.fail(f"ulimit -n is too low for {ATTACKERS} connections: raise it to 1024 or more")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def port_of(url: str) -> int:
    return urlsplit(url).port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)  # blocking: a timeout would make MSG_DONTWAIT peeks wait
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection or answered on it (it never answers an attacker
    anything but a refusal)."""
    try:
        return sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
    except BlockingIOError:
        return False
    except OSError:
        return True


def read_response(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


class SlowHeaders:
    """`count` connections that each send one more byte of a request head every `interval_s`."""

    def __init__(self, port: int, count: int, interval_s: float = 2.0):
        self.head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Type: application/json\r\nX-Padding: {'p' * 4000}\r\n\r\n").encode()
        self.socks = [connect(port) for _ in range(count)]
        self.interval_s = interval_s
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.is_set() and self.sent < len(self.head) - 4:
            for sock in self.socks:
                try:
                    sock.send(self.head[self.sent:self.sent + 1])
                except OSError:
                    pass  # closed by the server; counted by `held`
            self.sent += 1
            self.stop.wait(self.interval_s)

    def held(self) -> int:
        return sum(not closed_by_server(sock) for sock in self.socks)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


class IdleKeepAlive:
    """`count` connections that each make one request, read the answer and then sit idle, kept alive."""

    def __init__(self, port: int, count: int):
        self.socks = []
        request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        for _ in range(count):
            sock = connect(port)
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            self.socks.append(sock)

    def held(self) -> int:
        return sum(not closed_by_server(sock) for sock in self.socks)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def normal_request(url: str) -> tuple[int, float]:
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=NORMAL_WITHIN_S + 5) as client:
        status = client.post("/v1/chat/completions", json=NORMAL).status_code
    return status, time.perf_counter() - start


# The defaults (their per-client cap of 64 holds a one-address attack down), and a server whose per-client
# cap is its total (as behind a proxy), which holds every attack connection: slow heads until a 5 s head
# deadline, idle ones for a minute.
DEFAULTS = ServeConfig(model_name=MODEL, batch_wait_ms=2)
SLOW_CONFIGS = {
    "defaults": DEFAULTS,
    "one-cap": ServeConfig(model_name=MODEL, batch_wait_ms=2, max_connections_per_client=512,
                           request_head_timeout_s=5),
}
IDLE_CONFIGS = {
    "defaults": DEFAULTS,
    "one-cap": ServeConfig(model_name=MODEL, batch_wait_ms=2, max_connections_per_client=512,
                           request_head_timeout_s=60, keep_alive_timeout_s=60),
}


@pytest.mark.parametrize("config_name", list(SLOW_CONFIGS))
def test_normal_request_served_during_slow_header_attack(serve_engine, config_name):
    """300 connections each sending one header byte every 2 s; normal requests still answered 200 in 5 s."""
    config = SLOW_CONFIGS[config_name]
    with running_server(serve_engine, config) as url:
        assert normal_request(url)[0] == 200  # warm-up: the first generation compiles and allocates
        attack = SlowHeaders(port_of(url), ATTACKERS)
        try:
            results = []
            for _ in range(3):  # while the attack runs: at about 2, 4 and 6 s into it
                time.sleep(2.0)
                held = attack.held()
                status, seconds = normal_request(url)
                results.append((status, seconds, held, attack.sent))
            connections = httpx.get(f"{url}/health", timeout=10).json()["connections"]
        finally:
            attack.close()
    print(f"\n[{config_name}] {ATTACKERS} slow-header connections (1 byte / 2 s):")
    for status, seconds, held, sent in results:
        print(f"  normal request -> {status} in {seconds:.2f} s while {held} attack connections were open "
              f"({sent} header bytes sent on each)")
    print(f"  server connection stats: {connections}")
    assert [status for status, *_ in results] == [200, 200, 200]
    assert max(seconds for _, seconds, *_ in results) < NORMAL_WITHIN_S
    if config_name == "defaults":
        assert all(held == config.max_connections_per_client - 1 for *_, held, _ in results[1:]), results
        assert connections["evicted"] >= ATTACKERS - config.max_connections_per_client
    else:
        assert results[0][2] == ATTACKERS  # the server held all 300 while answering
        assert results[2][2] == 0 and connections["head_timeouts"] >= ATTACKERS  # ... until their head deadline


@pytest.mark.parametrize("config_name", list(IDLE_CONFIGS))
def test_normal_request_served_with_idle_keep_alive_connections(serve_engine, config_name):
    """300 kept-alive connections sitting idle after one request each; a normal request is answered 200 in 5 s."""
    config = IDLE_CONFIGS[config_name]
    with running_server(serve_engine, config) as url:
        assert normal_request(url)[0] == 200
        idle = IdleKeepAlive(port_of(url), ATTACKERS)
        try:
            held = idle.held()
            status, seconds = normal_request(url)
            connections = httpx.get(f"{url}/health", timeout=10).json()["connections"]
        finally:
            idle.close()
    print(f"\n[{config_name}] {ATTACKERS} idle keep-alive connections: normal request -> {status} in {seconds:.2f} s "
          f"while {held} of them were open; server connection stats: {connections}")
    assert status == 200 and seconds < NORMAL_WITHIN_S
    assert held == (ATTACKERS if config_name == "one-cap" else config.max_connections_per_client)


def test_full_server_evicts_idle_connections_and_refuses_only_when_all_are_busy(serve_engine):
    """At the cap, a newcomer closes the longest-idle connection; with every connection busy it gets 503."""
    config = ServeConfig(model_name=MODEL, batch_wait_ms=2, max_connections=4, max_connections_per_client=4,
                         request_body_timeout_s=30)
    with running_server(serve_engine, config) as url:
        port = port_of(url)
        silent = [connect(port) for _ in range(4)]
        time.sleep(0.2)
        status, _ = normal_request(url)  # evicts the longest-idle silent connection
        assert status == 200
        assert closed_by_server(silent[0]) and not any(closed_by_server(sock) for sock in silent[1:])
        for sock in silent:
            sock.close()
        # Four connections busy sending a body the server waits for: nothing can be closed for room.
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
        busy = [connect(port) for _ in range(4)]
        for sock in busy:
            sock.sendall(head)
        time.sleep(0.5)
        refused = read_response(connect(port))
        assert refused.startswith(b"HTTP/1.1 503"), refused[:200]
        assert b"retry-after: 1" in refused.lower() and b"maximum number of connections" in refused
        for sock in busy:
            sock.close()
        time.sleep(0.5)
        assert normal_request(url)[0] == 200


def test_head_deadline_and_keep_alive_timeout(serve_engine):
    """A connection that says nothing, or half a head, is closed at the head deadline (408 for the half
    head); an idle kept-alive connection is closed after keep_alive_timeout_s."""
    config = ServeConfig(model_name=MODEL, request_head_timeout_s=1.0, keep_alive_timeout_s=0.5,
                         max_connections_per_client=512)
    with running_server(serve_engine, config) as url:
        port = port_of(url)
        silent, partial, kept = connect(port), connect(port), connect(port)
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.")
        kept.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        start = time.monotonic()
        assert read_response(silent) == b""
        answer = read_response(partial)
        assert answer.startswith(b"HTTP/1.1 408") and b"request_head_timeout_s=1 s" in answer, answer
        kept_answer = read_response(kept)
        assert kept_answer.startswith(b"HTTP/1.1 200") and kept_answer.count(b"HTTP/1.1") == 1
        assert time.monotonic() - start < 8  # closed by the server, not by read_response's own timeout
        assert httpx.get(f"{url}/health").json()["connections"]["head_timeouts"] == 2


def post_head(port: int, length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def test_body_limits_apply_before_the_body_is_buffered(serve_engine):
    """A declared length over max_body_bytes is refused before a byte of body is read; a body that does
    not arrive in time gets 408; both close the connection (nobody reads the rest of such a body)."""
    config = ServeConfig(model_name=MODEL, max_body_bytes=64 * 1024, max_buffered_body_bytes=64 * 1024,
                         request_body_timeout_s=1.0)
    with running_server(serve_engine, config) as url:
        port = port_of(url)
        huge = connect(port)
        huge.sendall(post_head(port, 10**12))  # and no body at all
        answer = read_response(huge)
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
        assert b"max_body_bytes=65536" in answer

        slow = connect(port)
        slow.sendall(post_head(port, 100) + b'{"model": ')
        answer = read_response(slow)
        assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower()
        assert b"request_body_timeout_s=1 s" in answer


def test_buffered_body_bytes_are_bounded_across_requests(serve_engine):
    """While one request holds (almost) all of max_buffered_body_bytes, another body is refused with 503
    and Retry-After instead of being buffered too; once the first gives its bytes back, it is served."""
    config = ServeConfig(model_name=MODEL, batch_wait_ms=2, max_body_bytes=64 * 1024,
                         max_buffered_body_bytes=64 * 1024, request_body_timeout_s=2.0)
    with running_server(serve_engine, config) as url:
        port = port_of(url)
        holder = connect(port)
        holder.sendall(post_head(port, 65_536) + b" " * 65_500)  # holds 65500 of 65536 bytes, then stalls
        time.sleep(0.5)
        refused = httpx.post(f"{url}/v1/chat/completions", json=NORMAL, timeout=10)
        answer = read_response(holder)
        served = httpx.post(f"{url}/v1/chat/completions", json=NORMAL, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert "max_buffered_body_bytes=65536" in refused.json()["error"]["message"]
    assert answer.startswith(b"HTTP/1.1 408")  # the holder timed out, giving its bytes back ...
    assert served.status_code == 200  # ... and then a body fits again


def test_slow_bodies_from_one_address_leave_others_served(serve_engine):
    """300 connections from 127.0.0.2 that send a whole head and then one body byte every 2 s: they are
    busy (never closed for room), so that address keeps max_connections_per_client of them and is
    refused the rest; a client at 127.0.0.1 is served 200 within 5 s, and the slow bodies hold only
    the bytes they sent."""
    config = ServeConfig(model_name=MODEL, batch_wait_ms=2)
    with running_server(serve_engine, config) as url:
        port = port_of(url)
        assert normal_request(url)[0] == 200
        socks = []
        for _ in range(ATTACKERS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
            sock.settimeout(None)
            socks.append(sock)
            try:
                sock.sendall(post_head(port, 1_000_000))
            except OSError:
                pass  # refused and closed already
        try:
            results = []
            for byte in range(3):
                for sock in socks:
                    try:
                        sock.send(b"{ "[byte % 2:byte % 2 + 1])
                    except OSError:
                        pass
                time.sleep(2.0)
                held = sum(not closed_by_server(sock) for sock in socks)
                results.append((*normal_request(url), held))
            connections = httpx.get(f"{url}/health", timeout=10).json()["connections"]
        finally:
            for sock in socks:
                sock.close()
    print(f"\n{ATTACKERS} slow-body connections from 127.0.0.2: " + "; ".join(
        f"normal request -> {status} in {seconds:.2f} s ({held} held)" for status, seconds, held in results)
        + f"; server connection stats: {connections}")
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert max(seconds for _, seconds, _ in results) < NORMAL_WITHIN_S
    assert all(held == config.max_connections_per_client for *_, held in results)
    # Beyond the cap each newcomer was refused, or closed a 127.0.0.2 connection whose head had not arrived yet.
    assert connections["refused"] + connections["evicted"] == ATTACKERS - config.max_connections_per_client


def test_early_answers_close_the_connection(serve_engine):
    """An answer given before the body was read (wrong media type here) closes the connection, so a client
    cannot keep a connection busy sending a body nobody reads."""
    with running_server(serve_engine, ServeConfig(model_name=MODEL)) as url:
        port = port_of(url)
        sock = connect(port)
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Content-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n").encode() + b"x" * 1000)
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 415") and b"connection: close" in answer.lower()
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "unsupported_media_type"


def test_oversized_request_head_is_refused(serve_engine):
    """--max-header-bytes is h11's max_incomplete_event_size: a head still unfinished past it is a 400 and
    the connection is closed, so a trickled head buffers at most that much."""
    with running_server(serve_engine, ServeConfig(model_name=MODEL, max_header_bytes=4096)) as url:
        port = port_of(url)
        sock = connect(port)
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Padding: {'p' * 8000}".encode())
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 400") and b"connection: close" in answer.lower(), answer
        small = connect(port)
        small.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Padding: {'p' * 3000}".encode())
        time.sleep(0.2)
        small.sendall(b"\r\n\r\n")
        assert small.recv(65536).startswith(b"HTTP/1.1 200")
        small.close()
