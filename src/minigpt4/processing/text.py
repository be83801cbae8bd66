"""The caption processor used for stage-1 captions (BLIP's `blip_caption`)."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def process_caption(caption: str, max_words: int = 50, prompt: str = "") -> str:
    """Lower-case, replace . ! " ( ) * # : ; ~ with spaces, collapse whitespace, keep `max_words` words.

    Commas, apostrophes, hyphens, "?" and "/" are kept, as in the original.
    """
    text = _PUNCTUATION.sub(" ", caption.lower())
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return prompt + text
