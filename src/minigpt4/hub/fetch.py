"""Fetch a preset's released files into the cache, verify them, and remember them in a manifest.

Plain files go to `$MINIGPT4_CACHE/weights/` through `minigpt4.hub.http`; Hub repos stay in the
Hugging Face cache through huggingface_hub, so HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE and tokens behave
as everywhere else. Hub files are checked against the ETag the Hub sent, which huggingface_hub keeps
as the blob's name in its cache (the sha256 for LFS files, the git blob sha1 for small ones).

After a file is verified, `$MINIGPT4_CACHE/manifest.json` records its size, mtime and sha256; later
loads trust it when size and mtime still match, and `fetch --verify` hashes everything again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minigpt4.embedded import default_cache_dir
from minigpt4.hub.http import DownloadError, HttpSettings, download
from minigpt4.hub.sources import PRESETS, SOURCES, Source, human_size

log = logging.getLogger(__name__)

# Weight formats a Hub LLM repo may hold; one is fetched (safetensors when present).
_HUB_ALWAYS = ["*.json", "tokenizer.model", "*.txt"]
_HUB_WEIGHTS = {"safetensors": ["*.safetensors"], "bin": ["*.bin"]}

Report = Callable[[str], None]


def offline_mode() -> bool:
    """`MINIGPT4_OFFLINE=1`: nothing is downloaded; a missing file is an error."""
    return os.environ.get("MINIGPT4_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Manifest:
    """`manifest.json` in the cache: verified files (size, mtime, sha256) and each source's files."""

    path: Path
    files: dict[str, dict]
    sources: dict[str, dict]

    @classmethod
    def load(cls, cache: Path) -> Manifest:
        path = cache / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        except ValueError as err:
            log.warning("%s is not valid JSON (%s); starting a new manifest", path, err)
            data = {}
        return cls(path, dict(data.get("files", {})), dict(data.get("sources", {})))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"files": self.files, "sources": self.sources}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def record(self, path: Path, sha256: str, checked: str) -> None:
        stat = path.stat()
        self.files[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256,
                                 "checked": checked}

    def unchanged(self, path: Path) -> bool:
        """The cheap check: recorded, and size and mtime as recorded."""
        entry = self.files.get(str(path))
        try:
            stat = path.stat()
        except OSError:
            return False
        return bool(entry) and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns

    def complete(self, key: str) -> Path | None:
        """The source's path when every file recorded for it passes the cheap check."""
        entry = self.sources.get(key)
        if not entry or not all(self.unchanged(Path(f)) for f in entry["files"]):
            return None
        return Path(entry["path"])


def _digests(path: Path, chunk_size: int = 1 << 22) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one pass; the Hub's ETag is one or the other."""
    size = path.stat().st_size
    sha, git = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            sha.update(block)
            git.update(block)
    return sha.hexdigest(), git.hexdigest()


def _check_hub_file(path: Path) -> tuple[str, str]:
    """(sha256, what it was checked against) of a file in the Hub cache; a mismatch is an error."""
    etag = path.resolve().name
    sha256, git_sha1 = _digests(path)
    if len(etag) == 64 and sha256 != etag:
        raise DownloadError(f"{path}: sha256 {sha256} differs from the Hub's {etag}; delete {path.resolve()} "
                            "and fetch again")
    if len(etag) == 40 and git_sha1 != etag:
        raise DownloadError(f"{path}: git sha1 {git_sha1} differs from the Hub's {etag}; delete "
                            f"{path.resolve()} and fetch again")
    if len(etag) == 64:
        return sha256, "sha256 = the Hub's"
    if len(etag) == 40:
        return sha256, "git sha1 = the Hub's"
    log.warning("%s is not a Hub cache blob link; recorded its sha256 without a server hash", path)
    return sha256, "sha256 recorded (no server hash)"


def _hub_error(source: Source, err: Exception, offline: bool) -> DownloadError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{source.location} ({source.page()})"
    if isinstance(err, GatedRepoError):
        why = f"{where} is gated: accept its licence there and log in (`hf auth login` or HF_TOKEN)"
    elif isinstance(err, RepositoryNotFoundError):
        why = f"{where} was not found, or needs a token (HF_TOKEN)"
    elif isinstance(err, LocalEntryNotFoundError) and offline:
        why = f"{where} is not in the Hugging Face cache and downloads are off (offline mode)"
    else:
        detail = (str(err).splitlines() or [""])[0]
        why = f"cannot download {where} ({type(err).__name__}: {detail}; no network?)"
    note = f" ({source.note})" if source.note else ""
    return DownloadError(f"{source.filename}: {why}; download it by hand (`hf download {source.location}`"
                         f"{' --repo-type space' if source.repo_type == 'space' else ''}) or pass its path{note}")


def _hub_snapshot(source: Source, offline: bool) -> tuple[Path, list[Path]]:
    """(the path to use, its files) of a Hub source, downloaded unless `offline`."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        if source.filename and source.repo_type == "space":
            path = Path(hf_hub_download(source.location, source.filename, repo_type=source.repo_type,
                                        local_files_only=offline))
            return path, [path]
        patterns = None
        if not offline:
            names = HfApi().list_repo_files(source.location, repo_type=source.repo_type)
            fmt = "safetensors" if any(n.endswith(".safetensors") for n in names) else "bin"
            patterns = _HUB_ALWAYS + _HUB_WEIGHTS[fmt]
        folder = Path(snapshot_download(source.location, repo_type=source.repo_type, allow_patterns=patterns,
                                        local_files_only=offline))
    except Exception as err:  # the Hub's own errors and its HTTP client's (no network) share no base class
        raise _hub_error(source, err, offline) from None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise DownloadError(f"{source.filename}: the cached snapshot {folder} holds no weight files; "
                            f"fetch it again without offline mode ({source.page()})")
    return folder, files


def _manual(source: Source, dest: Path) -> str:
    note = f" ({source.note})" if source.note else ""
    return f"download {source.page()} by hand and put it at {dest}{note}"


class Fetcher:
    """Fetches sources into one cache and keeps its manifest up to date."""

    def __init__(self, cache: Path | None = None, *, offline: bool = False, report: Report = log.info,
                 settings: HttpSettings | None = None) -> None:
        self.cache = Path(cache) if cache is not None else default_cache_dir()
        self.offline = offline or offline_mode()
        self.report = report
        self.settings = settings
        self.manifest = Manifest.load(self.cache)

    def destination(self, source: Source) -> Path:
        return self.cache / "weights" / source.filename

    def cached(self, key: str) -> Path | None:
        """The source's path if it is complete and unchanged in the cache (no hashing, no network)."""
        return self.manifest.complete(key)

    def missing(self, preset: str) -> list[Source]:
        return [SOURCES[key] for key in preset_sources(preset).values() if self.cached(key) is None]

    def fetch(self, source: Source, verify: bool = False) -> Path:
        """Make `source` present and verified; `verify` re-hashes files the manifest already vouches for."""
        if not verify and (path := self.cached(source.key)) is not None:
            return path
        if source.kind == "hub":
            try:
                from huggingface_hub.constants import is_offline_mode
            except ImportError:  # older huggingface_hub
                from huggingface_hub.constants import HF_HUB_OFFLINE as hub_offline
            else:
                hub_offline = is_offline_mode()
            path, files = _hub_snapshot(source, self.offline or hub_offline)
            checked_now = []
            for file in files:
                if verify or not self.manifest.unchanged(file):
                    sha256, checked = _check_hub_file(file)
                    self._check_recorded(file, sha256)
                    self.manifest.record(file, sha256, checked)
                    checked_now.append(checked)
            if checked_now:
                kinds = ", ".join(sorted(set(checked_now)))
                self.report(f"verified {source.filename}: {len(checked_now)} file(s) in {path} ({kinds})")
        else:
            path = self.destination(source)
            files = [path]
            if path.exists():
                if verify or not self.manifest.unchanged(path):
                    sha256, _ = _digests(path)
                    self._check_recorded(path, sha256)
                    checked = self.manifest.files.get(str(path), {}).get("checked", "placed by hand, sha256 recorded")
                    self.manifest.record(path, sha256, checked)
                    self.report(f"verified {source.filename}: sha256 {sha256} ({checked})")
            elif self.offline:
                raise DownloadError(f"{source.filename} is not in the cache and downloads are off (offline mode); "
                                    f"{_manual(source, path)}")
            else:
                self.report(f"downloading {source.filename} from {source.url()} (~{human_size(source.approx_bytes)})")
                done = download(source.url(), path, label=source.filename, manual=_manual(source, path),
                                expected_size=source.size, follow_drive_form=source.kind == "drive",
                                settings=self.settings)
                checked = ", ".join(done.checked) or "nothing stated by the server"
                self.manifest.record(path, done.sha256, checked)
                self.report(f"verified {source.filename}: {checked}; sha256 {done.sha256}")
        self.manifest.sources[source.key] = {"path": str(path), "files": [str(f) for f in files]}
        self.manifest.save()
        return path

    def _check_recorded(self, path: Path, sha256: str) -> None:
        recorded = self.manifest.files.get(str(path), {}).get("sha256")
        if recorded and recorded != sha256:
            raise DownloadError(f"{path}: sha256 {sha256} differs from the one recorded when it was verified "
                                f"({recorded}); delete it and fetch again")

    def fetch_preset(self, preset: str, verify: bool = False) -> dict[str, Path]:
        """Every file of `preset`: role -> path."""
        return {role: self.fetch(SOURCES[key], verify=verify) for role, key in preset_sources(preset).items()}


def preset_sources(preset: str) -> dict[str, str]:
    if preset not in PRESETS:
        raise DownloadError(f"unknown preset {preset!r} to fetch; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def describe(sources: list[Source]) -> str:
    """`2 file(s), ~15.5 GB: eva_vit_g.pth (~2.0 GB), vicuna-7b (~13.5 GB)` for the line before a download."""
    total = sum(s.approx_bytes for s in sources)
    parts = ", ".join(f"{s.filename} (~{human_size(s.approx_bytes)})" for s in sources)
    return f"{len(sources)} file(s), ~{human_size(total)}: {parts}"


# role -> (config section, field) the role's file fills in a ModelConfig
ROLE_FIELDS = {"vit": ("weights", "vit"), "blip2": ("weights", "blip2"), "projection": ("weights", "projection"),
               "llm": ("llm", "path")}


def preset_cached(preset: str, cache: Path | None = None) -> bool:
    """Every file of `preset` is in the cache and unchanged since it was verified (no network, no hashing)."""
    fetcher = Fetcher(cache)
    return all(fetcher.cached(key) is not None for key in preset_sources(preset).values())


def fill_from_cache(cfg, preset: str, *, allow_fetch: bool, report: Report,
                    roles: tuple[str, ...] = tuple(ROLE_FIELDS)) -> list[str]:
    """Point every empty weight path of `cfg` (a ModelConfig) among `roles` at `preset`'s released file.

    Files not in the cache are fetched after one line that says what and how many GB, or, when
    `allow_fetch` is false (`--no-fetch`, `MINIGPT4_OFFLINE=1`), taken only from the caches, else an
    error naming the file and where it goes. Returns the roles filled.
    """
    wanted = {role: key for role, key in preset_sources(preset).items()
              if role in roles and not getattr(getattr(cfg, ROLE_FIELDS[role][0]), ROLE_FIELDS[role][1])}
    if not wanted:
        return []
    fetcher = Fetcher(offline=not allow_fetch, report=report)
    missing = [SOURCES[key] for key in wanted.values() if fetcher.cached(key) is None]
    if missing and not fetcher.offline:
        report(f"{preset}: first use, fetching {describe(missing)} into {fetcher.cache} "
               f"(`minigpt4 fetch {preset}` does the same; --no-fetch turns this off)")
    for role, key in wanted.items():
        section, name = ROLE_FIELDS[role]
        setattr(getattr(cfg, section), name, str(fetcher.fetch(SOURCES[key])))
    return list(wanted)
