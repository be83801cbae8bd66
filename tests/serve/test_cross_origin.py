"""Browsers and DNS rebinding: web pages cannot use the server unless their origin is allowed, and a
loopback server answers only to its own names.

The browser test serves a page from a second local HTTP server (another port, so another origin) and
has headless Chromium (Debian's, driven by Playwright as in test_demo_browser.py) fetch a completion.
"""

from __future__ import annotations

import http.server
import threading
from urllib.parse import urlsplit

import httpx
import pytest

from minigpt4.serve.config import ServeConfig

from .conftest import running_server

MODEL = "tiny"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Describe the cat."}], "max_tokens": 4,
       "temperature": 0}
ASK_TEXT = (b'{"model": "tiny", "messages": [{"role": "user", "content": "Describe the cat."}], "max_tokens": 4, '
            b'"temperature": 0}')


def rows_generated(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=10).json()["rows"]


@pytest.fixture(scope="module")
def default_server(serve_engine):
    with running_server(serve_engine, ServeConfig(model_name=MODEL, batch_wait_ms=2)) as url:
        yield url


def test_simple_cross_site_post_is_refused_before_any_work(default_server):
    """The request a web page can send without a preflight: text/plain with its Origin. 403, nothing generated."""
    before = rows_generated(default_server)
    response = httpx.post(f"{default_server}/v1/chat/completions", content=ASK_TEXT,
                          headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    print(f"\nPOST Origin: http://evil.example, Content-Type: text/plain -> {response.status_code} {response.text}")
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "origin_not_allowed" and "--cors-origin http://evil.example" in error["message"]
    assert "access-control-allow-origin" not in response.headers
    # Even with the JSON type, and for the read-only routes: an unlisted origin is refused.
    for method, path, extra in [("POST", "/v1/chat/completions", {"json": ASK}), ("GET", "/v1/models", {}),
                                ("OPTIONS", "/v1/chat/completions", {})]:
        answer = httpx.request(method, f"{default_server}{path}", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}, **extra)
        assert answer.status_code == 403, (method, path, answer.text)
    assert rows_generated(default_server) == before


@pytest.mark.parametrize("media_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_post_bodies_must_be_json(default_server, media_type):
    headers = {"Content-Type": media_type} if media_type else {}
    response = httpx.post(f"{default_server}/v1/chat/completions", content=ASK_TEXT, headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(f"{default_server}/v1/chat/completions", content=ASK_TEXT,
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("[::1]:{port}", 200), ("LOCALHOST:{port}", 200),
    ("evil.example:{port}", 421), ("evil.example", 421), ("127.0.0.1:1", 421), ("localhost", 421),
    ("127.0.0.1.evil.example:{port}", 421),
])
def test_loopback_server_answers_only_its_own_names(default_server, host, status):
    """DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    host = host.format(port=urlsplit(default_server).port)
    response = httpx.get(f"{default_server}/v1/models", headers={"Host": host})
    assert response.status_code == status, response.text
    if status == 421:
        error = response.json()["error"]
        assert error["code"] == "misdirected_request" and "DNS rebinding" in error["message"]
        assert repr(host) in error["message"]


def test_host_is_not_checked_when_bound_beyond_loopback(serve_engine):
    config = ServeConfig(model_name=MODEL, host="0.0.0.0")
    with running_server(serve_engine, config) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Host": "models.example.org"}).status_code == 200


def test_allowed_origin_gets_cors_headers(serve_engine):
    origin = "http://app.example:3000"
    with running_server(serve_engine, ServeConfig(model_name=MODEL, batch_wait_ms=2, cors_origins=(origin,))) as url:
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "POST" in preflight.headers["access-control-allow-methods"]
        answer = httpx.post(f"{url}/v1/chat/completions", json=ASK, headers={"Origin": origin})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        # The allowed origin still may not send a non-JSON body, and other origins stay refused.
        assert httpx.post(f"{url}/v1/chat/completions", content=ASK_TEXT,
                          headers={"Origin": origin, "Content-Type": "text/plain"}).status_code == 415
        assert httpx.post(f"{url}/v1/chat/completions", json=ASK,
                          headers={"Origin": "http://evil.example"}).status_code == 403


# ---------------------------------------------------------------- a real browser


@pytest.fixture
def page_origin():
    """A second local server (its own port, so its own origin) serving one blank page."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another site</title><p>another site</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()




# What a page's script would do: a JSON fetch (which needs CORS), and a "simple" text/plain one in
# no-cors mode (the browser sends it without asking, but hides the answer).
FETCHES = """async ([api, body]) => {
  const out = {};
  try {
    const r = await fetch(api + '/v1/chat/completions', {method: 'POST',
      headers: {'Content-Type': 'application/json'}, body});
    const j = await r.json();
    out.json = r.status + ' ' + (j.choices ? j.choices[0].message.content : JSON.stringify(j));
  } catch (e) { out.json = 'blocked: ' + e; }
  try {
    const r = await fetch(api + '/v1/chat/completions', {method: 'POST', mode: 'no-cors',
      headers: {'Content-Type': 'text/plain'}, body});
    out.simple = r.type + ' status=' + r.status + ' text=' + JSON.stringify(await r.text());
  } catch (e) { out.simple = 'blocked: ' + e; }
  return out;
}"""


def run_page(browser, page_url: str, api: str) -> dict:
    page = browser.new_page()
    try:
        page.goto(page_url)
        return page.evaluate(FETCHES, [api, ASK_TEXT.decode()])
    finally:
        page.close()


def test_page_from_another_origin_cannot_read_a_completion(serve_engine, browser, page_origin):
    with running_server(serve_engine, ServeConfig(model_name=MODEL, batch_wait_ms=2)) as api:
        before = rows_generated(api)
        result = run_page(browser, page_origin + "/", api)
        generated = rows_generated(api) - before
    print(f"\npage at {page_origin}, server at {api} (no --cors-origin): {result}; rows generated: {generated}")
    assert result["json"].startswith("blocked: TypeError"), result
    assert result["simple"] == 'opaque status=0 text=""', result
    assert generated == 0  # neither POST got any work done: the no-cors one was refused (403) unread


def test_page_from_an_allowed_origin_reads_a_completion(serve_engine, browser, page_origin):
    config = ServeConfig(model_name=MODEL, batch_wait_ms=2, cors_origins=(page_origin,))
    with running_server(serve_engine, config) as api:
        with httpx.Client(base_url=api, timeout=60) as client:
            expected = client.post("/v1/chat/completions", json=ASK).json()["choices"][0]["message"]["content"]
        result = run_page(browser, page_origin + "/", api)
    print(f"\npage at {page_origin}, server at {api} with --cors-origin {page_origin}: {result}")
    assert result["json"] == f"200 {expected}", result
    assert result["simple"] == 'opaque status=0 text=""', result  # text/plain is still refused (415), unread
