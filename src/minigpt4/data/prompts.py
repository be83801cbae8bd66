"""Stage-2 instruction prompts: a text file, one prompt per line, each with an `<ImageHere>` placeholder."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from minigpt4.processing.prompt import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = "resources/alignment_prompts.txt"


def load_prompts(path: str | Path | None, template: str) -> list[str]:
    """Read prompts and wrap each in `template` (e.g. "###Human: {} ###Assistant: ").

    Lines are kept byte for byte, as the original's `splitlines()` keeps them (a trailing space stays part of
    the prompt); blank lines are ignored and a line without `<ImageHere>` is dropped with a warning, as the
    original does. `path=None` reads the package's own four default prompts (our wording, not the original's:
    pass the original's `prompts/alignment.txt` to train on exactly its prompts).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no usable prompt, or a template without exactly one "{}".
    """
    if template.count("{}") != 1:
        raise ValueError(f"the prompt template must contain exactly one '{{}}', got {template!r}")
    if path is None:
        text = resources.files("minigpt4").joinpath(DEFAULT_PROMPTS).read_text(encoding="utf-8")
        label = f"minigpt4/{DEFAULT_PROMPTS}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        label = str(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if IMAGE_PLACEHOLDER not in line:
            logger.warning("%s:%d has no %s and is dropped: %r", label, number, IMAGE_PLACEHOLDER, line)
            continue
        prompts.append(template.replace("{}", line))
    if not prompts:
        raise ValueError(f"{label} has no prompt containing {IMAGE_PLACEHOLDER}; write one prompt per line")
    return prompts
