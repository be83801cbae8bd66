"""Held-out evaluation on generated shape images: does the description name the right colour and shape?

The model describes each held-out image greedily; the first colour word and the first shape word
(singular or plural) in its text are compared with what was drawn. Chance is 1/36 for both right.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minigpt4.chat.generation import GenerationSettings, generate
from minigpt4.data.synthetic import COLOURS, PLURALS, SHAPES
from minigpt4.processing.image import eval_transform, load_image
from minigpt4.processing.prompt import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_SHAPE_RE = re.compile(r"\b(" + "|".join(sorted(_SHAPE_WORDS, key=len, reverse=True)) + r")\b")


def parse_description(text: str) -> tuple[str | None, str | None]:
    """The first colour word and the first shape word (plurals mapped to the singular) in `text`."""
    lowered = text.lower()
    colour = _COLOUR_RE.search(lowered)
    shape = _SHAPE_RE.search(lowered)
    return (colour.group(1) if colour else None, _SHAPE_WORDS[shape.group(1)] if shape else None)


@dataclass
class ShapeScore:
    """Accuracy over the held-out images; `examples` keeps (truth, text) pairs for the report."""

    total: int = 0
    colour_right: int = 0
    shape_right: int = 0
    both_right: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add(self, colour: str, shape: str, text: str) -> None:
        got_colour, got_shape = parse_description(text)
        self.total += 1
        self.colour_right += got_colour == colour
        self.shape_right += got_shape == shape
        self.both_right += got_colour == colour and got_shape == shape
        self.examples.append((f"{colour} {shape}", text))

    @property
    def accuracy(self) -> float:
        return self.both_right / max(1, self.total)

    def summary(self) -> str:
        n = max(1, self.total)
        return (
            f"colour+shape {self.both_right}/{self.total} = {100 * self.both_right / n:.0f}% "
            f"(colour {100 * self.colour_right / n:.0f}%, shape {100 * self.shape_right / n:.0f}%; chance ~3%)"
        )


def describe(
    model, images: torch.Tensor, prompt: str = IMAGE_PLACEHOLDER, max_new_tokens: int = 16
) -> list[str]:
    """Greedy descriptions of a batch of (B, 3, H, W) images, through the chat engine's batched `generate`.

    `prompt` holds one `<ImageHere>` and is laid out exactly as in training; text stops at the first
    newline or "###" (the stage-1 and stage-2 end symbols).
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False, stop=["\n", "###"])
    completions = generate(model, [prompt] * images.shape[0], [[image] for image in images], settings)
    return [c.text.strip() for c in completions]


def evaluate_split(
    model, split_json: str | Path, prompt: str = IMAGE_PLACEHOLDER, batch_size: int = 50, max_new_tokens: int = 16
) -> ShapeScore:
    """Score the model on an evaluation split (validation or test) written by `minigpt4.data.synthetic.generate`."""
    split_json = Path(split_json)
    records = json.loads(split_json.read_text())
    transform = eval_transform(model.config.vision.image_size)
    score = ShapeScore()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            pixels = torch.stack([transform(load_image(split_json.parent / r["image"])) for r in chunk])
            for record, text in zip(chunk, describe(model, pixels, prompt, max_new_tokens), strict=True):
                score.add(record["colour"], record["shape"], text)
    finally:
        model.train(was_training)
    return score
