"""`minigpt4.hub.http.download` against a real HTTP server on 127.0.0.1 (tests/hub/fileserver.py)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket

import pytest

from minigpt4.hub.http import DownloadError, HttpSettings, download

from .fileserver import FileServer, Served

FAST = HttpSettings(timeout=1.0, retries=2, backoff=0.05, progress=False)
DATA = os.urandom(300_000)


def _md5_header(data: bytes) -> dict[str, str]:
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    return {"x-goog-hash": f"crc32c=AAAAAA==, md5={md5}"}


@pytest.fixture
def server():
    with FileServer(stall_seconds=3.0) as running:
        yield running


def _get(server, tmp_path, path="/eva_vit_g.pth", settings=FAST, **kwargs):
    return download(server.url(path), tmp_path / path.strip("/"), label=path.strip("/"),
                    manual=f"put it at {tmp_path}", settings=settings, **kwargs)


def test_plain_download_is_verified_against_size_and_goog_md5(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, headers=_md5_header(DATA))
    done = _get(server, tmp_path)
    assert done.path.read_bytes() == DATA
    assert done.sha256 == hashlib.sha256(DATA).hexdigest()
    assert done.checked == [f"size {len(DATA)} bytes (the server's)", "md5 = the server's x-goog-hash"]
    assert not (tmp_path / "eva_vit_g.pth.part").exists() and not (tmp_path / "eva_vit_g.pth.part.json").exists()


def test_cut_connection_resumes_with_a_range_request(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, headers=_md5_header(DATA), faults=["cut"])
    done = _get(server, tmp_path)
    assert done.path.read_bytes() == DATA
    cut = int(len(DATA) * server.cut_fraction)
    assert server.requests == [("/eva_vit_g.pth", None), ("/eva_vit_g.pth", f"bytes={cut}-")]


def test_a_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, faults=["cut"])
    no_retry = HttpSettings(timeout=1.0, retries=0, backoff=0.05, progress=False)
    with pytest.raises(DownloadError, match=r"gave up after 1 attempts, \d+ bytes kept in .*run the command again"):
        _get(server, tmp_path, settings=no_retry)
    kept = (tmp_path / "eva_vit_g.pth.part").stat().st_size
    assert 0 < kept < len(DATA)
    assert not (tmp_path / "eva_vit_g.pth").exists()  # nothing half-written under the real name
    done = _get(server, tmp_path)
    assert done.path.read_bytes() == DATA
    assert server.requests[-1] == ("/eva_vit_g.pth", f"bytes={kept}-")


def test_a_server_that_ignores_range_restarts_the_file_cleanly(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, headers=_md5_header(DATA), faults=["cut", "norange"])
    done = _get(server, tmp_path)
    assert done.path.read_bytes() == DATA  # the 200 answer replaced the partial file instead of being appended
    assert server.requests[1][1] is not None  # it was asked to resume


def test_a_stalled_server_triggers_the_retry(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, faults=["stall"])
    done = _get(server, tmp_path)
    assert done.path.read_bytes() == DATA
    assert len(server.requests) == 2 and server.requests[1][1] is not None  # the retry resumed


def test_server_errors_are_retried_then_reported_in_one_line(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, faults=["503"])
    assert _get(server, tmp_path).path.read_bytes() == DATA and len(server.requests) == 2
    server.files["/blip2.pth"] = Served(DATA, faults=["503"] * 3)
    with pytest.raises(DownloadError) as err:
        _get(server, tmp_path, path="/blip2.pth")
    assert str(err.value) == (f"blip2.pth: HTTP 503 Service Unavailable; gave up after 3 attempts, 0 bytes kept in "
                              f"{tmp_path / 'blip2.pth.part'}, run the command again to resume "
                              f"({server.url('/blip2.pth')}); put it at {tmp_path}")


def test_html_error_page_is_refused(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, faults=["html"])
    with pytest.raises(DownloadError, match=r"eva_vit_g.pth: the server answered with an HTML page \(Quota exceeded\)"):
        _get(server, tmp_path)
    assert not (tmp_path / "eva_vit_g.pth").exists() and not (tmp_path / "eva_vit_g.pth.part").exists()


def test_html_served_as_octet_stream_is_refused(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(b"\n  <!DOCTYPE html><html><title>Sign in</title></html>")
    with pytest.raises(DownloadError, match="HTML page"):
        _get(server, tmp_path)


def test_size_mismatch_is_refused(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA)
    with pytest.raises(DownloadError, match=f"offers {len(DATA)} bytes, expected {len(DATA) + 1}"):
        _get(server, tmp_path, expected_size=len(DATA) + 1)
    assert not (tmp_path / "eva_vit_g.pth").exists()


def test_md5_mismatch_is_refused_and_the_file_removed(server, tmp_path):
    server.files["/eva_vit_g.pth"] = Served(DATA, headers=_md5_header(DATA[:-1] + b"x"))
    with pytest.raises(DownloadError, match=r"md5 \w+ differs from the server's x-goog-hash \w+; the file was removed"):
        _get(server, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_drive_confirmation_page_is_followed(server, tmp_path):
    server.files["/pretrained_minigpt4.pth"] = Served(DATA, drive_id="1a4zL")
    done = _get(server, tmp_path, path="/pretrained_minigpt4.pth", follow_drive_form=True)
    assert done.path.read_bytes() == DATA
    assert [p for p, _ in server.requests] == ["/pretrained_minigpt4.pth", "/download"]


def test_drive_page_is_refused_where_no_form_is_expected(server, tmp_path):
    server.files["/pretrained_minigpt4.pth"] = Served(DATA, drive_id="1a4zL")
    with pytest.raises(DownloadError, match=r"HTML page \(Google Drive - Virus scan warning\)"):
        _get(server, tmp_path, path="/pretrained_minigpt4.pth")


def test_404_is_one_line_naming_url_and_where_to_put_the_file(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        _get(server, tmp_path, path="/missing.pth")
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"missing.pth: HTTP 404 Not Found ({server.url('/missing.pth')}); put it at {tmp_path}")
    assert len(server.requests) == 1  # a 404 is not retried


def test_closed_port_is_one_line_no_network(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/eva_vit_g.pth"
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "eva_vit_g.pth", label="eva_vit_g.pth", manual="put it at X", settings=FAST)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("eva_vit_g.pth: cannot connect: no network or the host is down")
    assert message.endswith(f"({url}); put it at X")
