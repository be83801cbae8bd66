"""The HTTP transport under the API: what a client may hold (connections, time, buffered bytes) and
the checks every request passes before a route sees it (Host, Origin, Content-Type).

uvicorn's own settings are used where they exist: `h11_max_incomplete_event_size` bounds the bytes
of an unfinished request head and `timeout_keep_alive` an idle keep-alive connection's life. Its
`limit_concurrency` is not used: it counts idle and half-sent connections with the working ones, so a
few hundred connections that send nothing (or one header byte every few seconds) make it answer every
real request 503, which is the starvation it should prevent. uvicorn has no deadline for a request
head (a connection that trickles its headers, or opens and says nothing, is held forever), no
per-client cap and no bound on the body bytes all requests buffer together; `ConnectionGate` and
`BodyReader` add those.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import h11
import uvicorn
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from minigpt4.serve.config import ServeConfig
from minigpt4.serve.errors import APIError, error_body

log = logging.getLogger(__name__)

# Open files the server needs besides its client sockets: model files, logs, the thread pool, image fetches.
_SPARE_FILES = 256


class ConnectionGate:
    """Admits, times and evicts the connections of one server (all on the event loop's thread).

    A connection is *waiting* from when it opens, and again from when an answer ends, until its next
    request head is complete. Waiting costs the server only a socket, so when a cap is reached (all
    connections, or one client address's) a waiting connection is closed to make room: the one that has
    waited longest, of the client that holds the most. One whose request is being handled is never
    closed for room; if none is waiting, the newcomer is answered 503. A connection whose head is not
    complete `request_head_timeout_s` after it began waiting is closed (with a 408 if it had sent part
    of a head).
    """

    def __init__(self, config: ServeConfig):
        self.max_total = config.max_connections
        self.max_per_client = config.max_connections_per_client
        self.head_timeout_s = config.request_head_timeout_s
        self.open: set[GuardedH11Protocol] = set()
        self.per_client: Counter[str] = Counter()
        self.waiting: dict[GuardedH11Protocol, asyncio.TimerHandle] = {}  # insertion order: longest waiting first
        self.events: Counter[str] = Counter()

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Count a new connection in, making room if a cap is reached; False: refuse it."""
        self.open.add(conn)
        self.per_client[conn.client_host] += 1
        self.wait(conn)
        if self.per_client[conn.client_host] > self.max_per_client:
            if not self._evict(conn, lambda other: other.client_host == conn.client_host):
                self.forget(conn)
                return False
        if len(self.open) > self.max_total and not self._evict(conn, lambda other: True):
            self.forget(conn)
            return False
        return True

    def wait(self, conn: GuardedH11Protocol) -> None:
        """`conn` now waits for a request head; its deadline starts now (not again on each byte)."""
        if conn in self.open and conn not in self.waiting:
            self.waiting[conn] = conn.loop.call_later(self.head_timeout_s, self._head_timed_out, conn)

    def busy(self, conn: GuardedH11Protocol) -> None:
        """`conn` has sent a complete head: it is handled, not waiting."""
        timer = self.waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def forget(self, conn: GuardedH11Protocol) -> None:
        """`conn` is closed or being closed (idempotent)."""
        self.busy(conn)
        if conn in self.open:
            self.open.discard(conn)
            self.per_client[conn.client_host] -= 1
            if not self.per_client[conn.client_host]:
                del self.per_client[conn.client_host]

    def stats(self) -> dict[str, int]:
        return {"open": len(self.open), "waiting": len(self.waiting), "evicted": self.events["evicted"],
                "refused": self.events["refused"], "head_timeouts": self.events["head_timeouts"]}

    def _evict(self, newcomer: GuardedH11Protocol, eligible: Callable[[GuardedH11Protocol], bool]) -> bool:
        """Close the longest-waiting eligible connection of the client that holds the most connections
        (so one client's flood evicts its own connections, not a client holding one)."""
        candidates = [conn for conn in self.waiting if conn is not newcomer and eligible(conn)]
        victim = max(candidates, key=lambda conn: self.per_client[conn.client_host], default=None)
        if victim is None:
            self.events["refused"] += 1
            return False
        self.forget(victim)
        self.events["evicted"] += 1
        victim.close_waiting(None)
        return True

    def _head_timed_out(self, conn: GuardedH11Protocol) -> None:
        self.waiting.pop(conn, None)
        self.forget(conn)
        self.events["head_timeouts"] += 1
        conn.close_waiting(f"the request head did not arrive within request_head_timeout_s={self.head_timeout_s:g} s")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, reporting to a `ConnectionGate` when it opens, waits, works and closes.

    `protocol_for` makes a subclass per server with its gate; uvicorn creates one instance per connection.
    """

    gate: ConnectionGate
    client_host: str = ""
    refused: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.client_host = self.client[0] if self.client else ""
        if not self.gate.admit(self):
            self.refused = True
            self._answer_and_close(503, "the server holds its maximum number of connections, all busy; retry later",
                                   {"retry-after": "1"})

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._report()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._report()

    def close_waiting(self, timeout_message: str | None) -> None:
        """Close a connection that has no request in progress; a 408 first if it had sent part of a head."""
        if self.transport.is_closing():
            return
        if timeout_message is not None and self.conn.trailing_data[0]:
            self._answer_and_close(408, timeout_message, {})
        else:
            self.transport.close()

    def _report(self) -> None:
        if self.transport.is_closing():
            self.gate.forget(self)
        elif self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self.gate.wait(self)
        else:
            self.gate.busy(self)

    def _answer_and_close(self, status: int, message: str, headers: dict[str, str]) -> None:
        body = json.dumps(error_body(status, message)).encode()
        fields = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close"),
                  *headers.items()]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=status, headers=fields)) or b"")
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # h11 is mid-message: nothing more can be said on this connection
            pass
        self.transport.close()


def protocol_for(gate: ConnectionGate) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"gate": gate})


def server_config(app: Any, config: ServeConfig, **uvicorn_options: Any) -> uvicorn.Config:
    """uvicorn's settings for `app` (made by `create_app`, which holds the gate) under `config`."""
    return uvicorn.Config(
        app, host=config.host, port=config.port, http=protocol_for(app.state.connection_gate), ws="none",
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=config.max_header_bytes, **uvicorn_options,
    )


def ensure_file_limit(config: ServeConfig) -> None:
    """Raise the soft open-files limit to fit `max_connections` sockets (uvicorn does not), or fail early
    if the hard limit is too low. A no-op where the `resource` module does not exist."""
    try:
        import resource
    except ImportError:
        return
    needed = config.max_connections + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(
            f"serve.max_connections={config.max_connections} needs {needed} open files, but the hard limit "
            f"(ulimit -Hn) is {hard}; lower --max-connections or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def binds_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGate:
    """ASGI middleware run before routing: checks Host (when the server binds loopback) and Origin, and
    closes a connection whose request was answered before its body was read.

    Starlette's TrustedHostMiddleware ignores the port and answers a bare "Invalid host header", and
    CORSMiddleware answers disallowed origins' requests anyway (only the browser hides the answer, after
    the work is done); this refuses both in OpenAI's error shape, with the fix. Allowed origins then go
    through CORSMiddleware for the preflight and the response headers.
    """

    def __init__(self, app: ASGIApp, *, check_host: bool, origins: Collection[str]):
        self.app = app
        self.check_host = check_host
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        body_done = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers

        async def receive_counting() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_closing(message: Message) -> None:
            # An answer given before the body was read: uvicorn would otherwise read and discard the rest of
            # the body on a kept-alive connection, for as long as the client cares to send it.
            if message["type"] == "http.response.start" and not body_done:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive_counting, send_closing)
            return
        await self.app(scope, receive_counting, send_closing)

    def _refusal(self, scope: Scope, headers: Headers) -> APIError | None:
        if self.check_host:
            port = scope["server"][1] if scope.get("server") else None
            names = ("localhost", "127.0.0.1", "[::1]")
            allowed = {f"{name}:{port}" for name in names} | (set(names) if port == 80 else set())
            host = headers.get("host", "")
            if host.lower() not in allowed:
                return APIError(
                    421, f"Host {host!r} is not this server's name: a server bound to loopback answers only "
                    f"{', '.join(sorted(allowed))} (a guard against DNS rebinding); bind --host to serve other names",
                    code="misdirected_request",
                )
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            allowed_text = f"allowed: {', '.join(sorted(self.origins))}" if self.origins else "none is allowed"
            return APIError(
                403, f"requests from web pages at origin {origin!r} are refused ({allowed_text}); "
                f"start the server with --cors-origin {origin} to allow them", code="origin_not_allowed",
            )
        return None


class BodyReader:
    """Reads a JSON request body within its bounds, each checked before the bytes it guards are read:

    the media type (415 unless `application/json`, so a web page cannot send a CORS-"simple" text/plain
    or form request), the size (413: a declared Content-Length before reading, any body while counting),
    the time (408 after `request_body_timeout_s`), and the body bytes all requests hold together
    (`max_buffered_body_bytes`, counted as they arrive and until the caller is done; past it the request
    is answered 503 with Retry-After at once). Counting what arrived rather than what is declared means
    a slow sender holds only what it has sent; answering at once rather than waiting for room means
    bodies that each hold part of the room never wait on each other.
    """

    def __init__(self, config: ServeConfig):
        self.limit = config.max_body_bytes
        self.timeout_s = config.request_body_timeout_s
        self.room = config.max_buffered_body_bytes
        self.held = 0  # by all requests (on the event loop's thread)

    @asynccontextmanager
    async def read(self, request: Request) -> AsyncIterator[bytes]:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}; "
                           "send the body as JSON with 'Content-Type: application/json'", code="unsupported_media_type")
        too_big = APIError(
            413, f"the request body exceeds the limit max_body_bytes={self.limit}; send fewer or smaller images",
            code="request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            raise too_big
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size = [], 0
        try:
            stream = request.stream()
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), deadline - loop.time())
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request body did not arrive within request_body_timeout_s="
                                   f"{self.timeout_s:g} s", code="request_timeout") from None
                except ClientDisconnect:
                    raise APIError(400, "the client closed the connection before sending the whole body") from None
                if size + len(chunk) > self.limit:
                    raise too_big
                if self.held + len(chunk) > self.room:
                    raise APIError(
                        503, f"the server is holding max_buffered_body_bytes={self.room} bytes of request bodies; "
                        "retry later", code="unavailable", headers={"Retry-After": "1"},
                    )
                self.held += len(chunk)
                size += len(chunk)
                chunks.append(chunk)
            yield b"".join(chunks)
        finally:
            self.held -= size
