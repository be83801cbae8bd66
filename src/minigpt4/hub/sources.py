"""Where every released file comes from: the one table of sources, and the presets built from it.

Facts from the original repository (see the project notes "released-files"). No machine of this
project reaches these hosts, so exact sizes and hashes are not written here: each download is checked
against what its server states (Content-Length, Google Storage's `x-goog-hash` md5, the Hub's sha256),
and `approx_bytes` only feeds the "how many GB" line printed before a download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

GB = 1_000_000_000


@dataclass(frozen=True)
class Source:
    """One released file or Hub repository.

    kind: `url` (a plain HTTPS file), `drive` (a Google Drive file id; its virus-scan page is followed),
    `hub` (a Hugging Face repo through huggingface_hub; `filename` picks one file, else the whole model).
    """

    key: str
    filename: str  # the file's released name (url/drive/hub file) or a label for a repo
    kind: Literal["url", "drive", "hub"]
    location: str  # the URL, the Drive file id, or the Hub repo id
    approx_bytes: int  # an estimate for the size line only (not verified against)
    hash_source: str  # what a download is verified against
    size: int | None = None  # exact bytes when known in advance (verified)
    repo_type: Literal["model", "space"] = "model"
    note: str = ""

    def url(self) -> str:
        """The URL to GET (url/drive); `$MINIGPT4_MIRROR/FILENAME` when that variable names a mirror."""
        mirror = os.environ.get("MINIGPT4_MIRROR")
        if mirror:
            return f"{mirror.rstrip('/')}/{self.filename}"
        if self.kind == "drive":
            return f"https://drive.usercontent.google.com/download?id={self.location}&export=download"
        return self.location

    def page(self) -> str:
        """Where a person gets the file by hand."""
        if self.kind == "drive":
            return f"https://drive.google.com/file/d/{self.location}/view"
        if self.kind == "hub":
            prefix = "spaces/" if self.repo_type == "space" else ""
            return f"https://huggingface.co/{prefix}{self.location}"
        return self.location


_LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"

SOURCES: dict[str, Source] = {
    s.key: s
    for s in (
        Source("eva_vit_g", "eva_vit_g.pth", "url", f"{_LAVIS}/eva_vit_g.pth", 2 * GB,
               "Content-Length + x-goog-hash md5"),
        Source("blip2", "blip2_pretrained_flant5xxl.pth", "url", f"{_LAVIS}/blip2_pretrained_flant5xxl.pth",
               GB // 2, "Content-Length + x-goog-hash md5"),
        Source("vicuna-7b", "vicuna-7b", "hub", "Vision-CAIR/vicuna-7b", 27 * GB // 2, "Hub sha256 per file"),
        Source("vicuna-13b", "vicuna-13b", "hub", "Vision-CAIR/vicuna", 26 * GB, "Hub sha256 per file"),
        Source("llama2-7b-chat", "Llama-2-7b-chat-hf", "hub", "meta-llama/Llama-2-7b-chat-hf", 27 * GB // 2,
               "Hub sha256 per file", note="gated: accept the licence on its Hub page and log in (HF_TOKEN)"),
        # The 7B projection's only stable public copy is the authors' Space (Drive ids in `note`).
        Source("projection-7b", "prerained_minigpt4_7b.pth", "hub", "Vision-CAIR/minigpt4", 13 * GB // 1000,
               "Hub sha256", repo_type="space",
               note="also Google Drive 1RY9jV0dyqLX-o38LrumkKRh6Jtaop58R"),
        Source("projection-13b", "pretrained_minigpt4.pth", "drive", "1a4zLvaiDBr-36pasffmgpvH5P7CKmpze",
               16 * GB // 1000, "none stated: sha256 recorded on first download",
               note="older link id 1u9FRRBB3VovP1HxCAlpD9Lw4t4P6-Yq8"),
        Source("projection-llama2-7b", "pretrained_minigpt4_llama2_7b.pth", "drive",
               "11nAPjEok8eAGGEG1N2vXo3kBLCg0WgUk", 93 * GB // 1000,
               "none stated: sha256 recorded on first download"),
    )
}

# preset -> role -> source key. Roles are the config fields the file fills (see fetch.apply_to_config).
PRESETS: dict[str, dict[str, str]] = {
    "minigpt4-7b": {"vit": "eva_vit_g", "blip2": "blip2", "llm": "vicuna-7b", "projection": "projection-7b"},
    "minigpt4-13b": {"vit": "eva_vit_g", "blip2": "blip2", "llm": "vicuna-13b", "projection": "projection-13b"},
    # The Llama-2 release has no Q-Former, so no BLIP-2 file (its preset's connector is merge4).
    "minigpt4-llama2-7b": {"vit": "eva_vit_g", "llm": "llama2-7b-chat", "projection": "projection-llama2-7b"},
}


def human_size(size: int) -> str:
    return f"{size / GB:.1f} GB" if size >= GB // 10 else f"{size / 1e6:.0f} MB"


def released_size(preset: str) -> str:
    """The approximate download size of a preset, e.g. `16.0 GB`."""
    return human_size(sum(SOURCES[key].approx_bytes for key in PRESETS[preset].values()))
