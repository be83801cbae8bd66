"""A real HTTP file server on 127.0.0.1 (a thread) with byte ranges and scripted faults, for download tests.

Each served path has a `Served` entry: the bytes, extra headers, and faults for its first requests
(cut the connection part-way, stall part-way, answer with an HTML page, or Google Drive's confirmation
form). Every request is logged with its Range header, so tests can assert that a download resumed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DRIVE_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="/download" method="get">
<input type="submit" value="Download anyway"/><input type="hidden" name="id" value="{id}">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="{uuid}"></form></body></html>"""


@dataclass
class Served:
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    # consumed one per request: "cut", "stall", "html", "norange" (ignore Range: the whole file, 200), "503", "ok"
    faults: list[str] = field(default_factory=list)
    drive_id: str = ""  # set: the path answers with Drive's confirmation page; /download?id=...&uuid=... serves it


class FileServer:
    """`with FileServer() as server: server.files["/a.bin"] = Served(b"...")`; `server.url("/a.bin")`."""

    def __init__(self, stall_seconds: float = 3.0, cut_fraction: float = 0.4, rate: int = 0) -> None:
        self.files: dict[str, Served] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.stall_seconds, self.cut_fraction, self.rate = stall_seconds, cut_fraction, rate
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(req.path)
        self.requests.append((parts.path, req.headers.get("Range")))
        served = self.files.get(parts.path)
        if parts.path == "/download":  # Drive's form target
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            served = next((s for s in self.files.values() if s.drive_id and s.drive_id == query.get("id")), None)
            if served is None or query.get("uuid") != "uuid-" + served.drive_id or query.get("confirm") != "t":
                return self._send(req, 403, b"<html><title>Forbidden</title></html>", {"Content-Type": "text/html"})
        elif served is not None and served.drive_id:
            page = DRIVE_PAGE.format(id=served.drive_id, uuid="uuid-" + served.drive_id).encode()
            return self._send(req, 200, page, {"Content-Type": "text/html; charset=utf-8"})
        if served is None:
            return self._send(req, 404, b"<html><title>Not Found</title></html>", {"Content-Type": "text/html"})
        fault = served.faults.pop(0) if served.faults else "ok"
        if fault == "503":
            return self._send(req, 503, b"busy", {"Content-Type": "text/plain"})
        if fault == "html":
            page = b"<!DOCTYPE html><html><head><title>Quota exceeded</title></head><body>Try later</body></html>"
            return self._send(req, 200, page, {"Content-Type": "text/html"})
        data, start = served.data, 0
        headers = {"Content-Type": "application/octet-stream", "ETag": '"v1"', "Accept-Ranges": "bytes",
                   **served.headers}
        status = 200
        ranged = req.headers.get("Range") if fault != "norange" else None
        if ranged and ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[len("bytes="):-1])
            if start >= len(data):
                return self._send(req, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        req.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body)), "Connection": "close"}.items():
            req.send_header(key, value)
        req.end_headers()
        if fault in ("cut", "stall"):
            cut = int(len(body) * self.cut_fraction)
            req.wfile.write(body[:cut])
            req.wfile.flush()
            if fault == "stall":
                time.sleep(self.stall_seconds)
            req.close_connection = True
            return
        step = max(1, self.rate // 10) if self.rate else len(body) or 1
        for i in range(0, len(body), step):
            req.wfile.write(body[i:i + step])
            if self.rate:
                req.wfile.flush()
                time.sleep(0.1)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        req.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body)), "Connection": "close"}.items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(body)
