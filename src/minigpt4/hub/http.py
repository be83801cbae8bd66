"""Resumable, verified HTTP downloads of single large files (Google Storage, Google Drive).

huggingface_hub handles Hub repos. For plain URLs nothing among our dependencies resumes a partial
file from a `Range` request, follows Google Drive's "can't scan for viruses" page and checks Google
Storage's `x-goog-hash`, so this module does those on top of httpx:

- the bytes go to `NAME.part` (its validator and the server's hashes in `NAME.part.json`); a later
  attempt or run asks for `Range: bytes=SIZE-` (with `If-Range`) and appends;
- a dropped or stalled connection (no byte for `timeout` seconds) is retried with doubling back-off;
- an HTML page is refused before it can be taken for the file (Drive's confirmation form is followed);
- the finished file must have the expected size and the server's md5; it is fsynced, then renamed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

log = logging.getLogger(__name__)

_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")
_HTML_SNIFF_LIMIT = 1 << 20  # read at most this much of an HTML answer to explain or follow it


class DownloadError(Exception):
    """A download that cannot succeed as asked; the message is one line naming the URL and the fix."""


class _Retry(Exception):
    """A transient failure (dropped connection, stall, 5xx): try again from the partial file."""


@dataclass
class HttpSettings:
    """Network behaviour; `from_env` reads MINIGPT4_HTTP_TIMEOUT / _RETRIES / _BACKOFF."""

    timeout: float = 60.0  # seconds without a byte before a connection counts as stalled
    retries: int = 5  # attempts after the first
    backoff: float = 2.0  # seconds before the first retry, doubled for each further one
    progress: bool = True

    @classmethod
    def from_env(cls) -> HttpSettings:
        defaults = cls()
        try:
            return cls(
                timeout=float(os.environ.get("MINIGPT4_HTTP_TIMEOUT", defaults.timeout)),
                retries=int(os.environ.get("MINIGPT4_HTTP_RETRIES", defaults.retries)),
                backoff=float(os.environ.get("MINIGPT4_HTTP_BACKOFF", defaults.backoff)),
            )
        except ValueError as err:
            raise DownloadError(f"MINIGPT4_HTTP_TIMEOUT/_RETRIES/_BACKOFF must be numbers ({err})") from err


@dataclass
class Downloaded:
    """A finished, verified file and what it was checked against."""

    path: Path
    size: int
    sha256: str
    checked: list[str]  # e.g. ["size 2025 bytes (Content-Length)", "md5 (x-goog-hash)"]


class _DriveForm(HTMLParser):
    """Google Drive's virus-scan page: `<form id="download-form" action=...>` with hidden inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._inside = False
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form" and attr.get("id") == "download-form":
            self.action, self._inside = attr.get("action", ""), True
        elif tag == "input" and self._inside and attr.get("name"):
            self.fields[attr["name"]] = attr.get("value", "")
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data.strip()


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:16].lower().startswith(_HTML_STARTS)


def _goog_md5(headers: httpx.Headers) -> str | None:
    """The md5 (hex) from Google Storage's `x-goog-hash: crc32c=...,md5=...` headers, if stated."""
    for value in headers.get_list("x-goog-hash", split_commas=True):
        kind, _, digest = value.strip().partition("=")
        if kind == "md5":
            return base64.b64decode(digest).hex()
    return None


def _hash_file(path: Path, chunk_size: int = 1 << 22) -> tuple[str, str]:
    """(sha256, md5) of a file in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Transfer:
    """One file's download: the state shared by its attempts."""

    def __init__(self, url: str, dest: Path, *, label: str, manual: str, expected_size: int | None,
                 settings: HttpSettings, follow_drive_form: bool) -> None:
        self.url, self.dest, self.label, self.manual = url, dest, label, manual
        self.expected_size, self.settings, self.follow_drive_form = expected_size, settings, follow_drive_form
        self.current_url = url  # the Drive confirmation form's target once it was followed
        self.part = dest.with_name(dest.name + ".part")
        self.meta_path = dest.with_name(dest.name + ".part.json")

    def fail(self, why: str) -> DownloadError:
        return DownloadError(f"{self.label}: {why} ({self.url}); {self.manual}")

    def _meta(self) -> dict:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) and meta.get("url") == self.url else {}

    def _restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)

    def attempt(self, client: httpx.Client) -> dict:
        """One GET from the current end of the partial file; returns the saved metadata."""
        offset = self.part.stat().st_size if self.part.exists() else 0
        meta = self._meta() if offset else {}
        if offset and not meta:  # a partial file whose origin is unknown cannot be trusted
            self._restart()
            offset = 0
        if offset and meta.get("total") == offset:
            return meta  # complete from an earlier run, not yet verified
        followed = self.current_url != self.url
        url = self.current_url if followed else meta.get("final_url") or self.url
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if meta.get("validator"):
                headers["If-Range"] = meta["validator"]
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416 and offset:
                self._restart()
                raise _Retry("the server refused to resume the partial file; starting over")
            if response.status_code in (408, 429) or response.status_code >= 500:
                raise _Retry(f"HTTP {response.status_code} {response.reason_phrase}")
            if response.status_code >= 400:
                raise self.fail(f"HTTP {response.status_code} {response.reason_phrase}")
            head = b""
            stream = response.iter_bytes()  # as the bytes arrive: a cut loses nothing already received
            if response.status_code == 200 or "html" in response.headers.get("content-type", ""):
                head = next(stream, b"")
                if "text/html" in response.headers.get("content-type", "") or _looks_like_html(head):
                    return self._html(client, response, head, stream)
            if response.status_code == 206:
                start, _, total = response.headers.get("content-range", "").removeprefix("bytes ").partition("/")
                if not start.startswith(f"{offset}-"):
                    self._restart()
                    raise _Retry(f"the server resumed at {start!r} instead of byte {offset}; starting over")
                total_size = int(total) if total.isdigit() else None
            else:
                if offset:
                    log.info("%s: the server sent the whole file instead of resuming; starting over", self.label)
                    offset = 0
                length = response.headers.get("content-length")
                total_size = int(length) if length and length.isdigit() else None
            if self.expected_size is not None and total_size is not None and total_size != self.expected_size:
                self._restart()
                raise self.fail(f"the server offers {total_size} bytes, expected {self.expected_size}")
            meta = {
                "url": self.url,
                "final_url": str(response.url),
                "validator": response.headers.get("etag") or response.headers.get("last-modified"),
                "total": total_size,
                "md5": _goog_md5(response.headers) or meta.get("md5"),
            }
            self.meta_path.write_text(json.dumps(meta))
            self._write(response, offset, head, stream, total_size)
            return meta

    def _write(self, response: httpx.Response, offset: int, head: bytes, stream, total: int | None) -> None:
        bar = _progress(self.label, total, offset, self.settings.progress)
        written = offset
        try:
            with self.part.open("r+b" if offset else "wb") as fh:
                fh.seek(offset)
                fh.truncate()
                try:
                    for block in ([head] if head else []):
                        fh.write(block)
                        written += len(block)
                        bar.update(len(block))
                    for block in stream:
                        fh.write(block)
                        written += len(block)
                        bar.update(len(block))
                except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as err:
                    what = "stalled" if isinstance(err, httpx.TimeoutException) else "dropped"
                    raise _Retry(f"connection {what} at byte {written} of {total or '?'}") from err
                finally:
                    fh.flush()
                    os.fsync(fh.fileno())
        finally:
            bar.close()
        if total is not None and written < total:
            raise _Retry(f"connection closed at byte {written} of {total}")

    def _html(self, client: httpx.Client, response: httpx.Response, head: bytes, stream) -> dict:
        body = head
        for block in stream:
            body += block
            if len(body) > _HTML_SNIFF_LIMIT:
                break
        page = _DriveForm()
        page.feed(body.decode("utf-8", "replace"))
        if self.follow_drive_form and page.action is not None:
            target = urljoin(str(response.url), page.action)
            target = f"{target}{'&' if urlsplit(target).query else '?'}{urlencode(page.fields)}"
            log.info("%s: following Google Drive's download confirmation", self.label)
            raise _FollowForm(target)
        self._restart()
        title = f" ({page.title})" if page.title else ""
        raise self.fail(f"the server answered with an HTML page{title} instead of the file")


class _FollowForm(Exception):
    """Drive's confirmation page was read: fetch its form's target next (not a failure, no back-off)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


def _progress(label: str, total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled, file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
    )


def download(url: str, dest: Path, *, label: str, manual: str, expected_size: int | None = None,
             follow_drive_form: bool = False, settings: HttpSettings | None = None) -> Downloaded:
    """Download `url` to `dest` (resuming `dest.part`), verify it, then move it into place atomically.

    Args:
        label: the file's name in messages and on the progress bar.
        manual: the sentence that tells a user how to get the file by hand (ends every error).
        expected_size: bytes the file must have, when known in advance.
        follow_drive_form: follow Google Drive's virus-scan confirmation form instead of refusing it.
    """
    settings = settings or HttpSettings.from_env()
    dest.parent.mkdir(parents=True, exist_ok=True)
    job = _Transfer(url, dest, label=label, manual=manual, expected_size=expected_size, settings=settings,
                    follow_drive_form=follow_drive_form)
    timeout = httpx.Timeout(settings.timeout)
    failures = 0
    forms = 0
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        while True:
            try:
                meta = job.attempt(client)
                break
            except _FollowForm as follow:
                forms += 1
                if forms > 2:
                    job._restart()
                    raise job.fail("Google Drive kept answering with its confirmation page") from None
                job.current_url = follow.target
                continue
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                raise job.fail(f"cannot connect: no network or the host is down [{err}]") from None
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as err:
                reason = f"connection failed before the body ({type(err).__name__})"
            except _Retry as err:
                reason = str(err)
            failures += 1
            have = job.part.stat().st_size if job.part.exists() else 0
            if failures > settings.retries:
                raise job.fail(f"{reason}; gave up after {failures} attempts, {have} bytes kept in {job.part}, "
                               "run the command again to resume")
            delay = settings.backoff * 2 ** (failures - 1)
            log.warning("%s: %s; retrying in %.1f s from byte %d (attempt %d of %d)",
                        label, reason, delay, have, failures + 1, settings.retries + 1)
            time.sleep(delay)
    return _finish(job, meta)


def _finish(job: _Transfer, meta: dict) -> Downloaded:
    size = job.part.stat().st_size
    checked = []
    for what, expected in (("expected", job.expected_size), ("the server's", meta.get("total"))):
        if expected is not None:
            if size != expected:
                job._restart()
                raise job.fail(f"the file has {size} bytes, {what} size is {expected}; the partial file was removed")
            checked.append(f"size {size} bytes ({what})")
    sha256, md5 = _hash_file(job.part)
    if meta.get("md5"):
        if md5 != meta["md5"]:
            job._restart()
            raise job.fail(f"md5 {md5} differs from the server's x-goog-hash {meta['md5']}; the file was removed")
        checked.append("md5 = the server's x-goog-hash")
    os.replace(job.part, job.dest)
    _fsync_dir(job.dest.parent)
    job.meta_path.unlink(missing_ok=True)
    return Downloaded(job.dest, size, sha256, checked)
