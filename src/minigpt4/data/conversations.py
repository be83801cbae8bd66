"""Instruction data: image conversations in LLaVA's instruction-tuning layout (`llava_instruct_150k.json`).

    FILE.json  [{"id": "0", "image": "images/0.jpg",
                 "conversations": [{"from": "human", "value": "<image>\\nWhat colour is it?"},
                                   {"from": "gpt", "value": "Red."}, ...]}, ...]

Image paths are relative to the JSON file's folder. The `<image>` tag (and the newline next to it) is taken
out of the first question: the training layout puts the image before the first question, as chat does. A
sample's text is its exchanges [[question, answer], ...] as JSON (the feature cache stores it as it is); the
training loop lays every answer out as a target (`minigpt4.processing.prompt.layout_conversation`). Passes,
dealing to readers and skips are those of the stage-2 aligned reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from minigpt4.data import SkippedSample
from minigpt4.data.aligned import AlignedSource, listed_batches, read_listed_image
from minigpt4.data.pipeline import Candidate, ImageTransform, check_layout, stable_seed
from minigpt4.processing.image import MAX_IMAGE_BYTES

IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")


def read_conversations(path: str | Path) -> list[dict]:
    """The records of a conversation file, as the file holds them.

    Raises:
        FileNotFoundError / ValueError: naming the file, when it is missing or not a JSON list of objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a conversations dataset is a JSON file in LLaVA's "
                                "instruction layout")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise ValueError(f'{path} must be a list of {{"id", "image", "conversations": [{{"from", "value"}}, ...]}}')
    return data


def exchanges(record: dict) -> list[list[str]] | str:
    """[[question, answer], ...] of one record, the image tag taken out; or what is wrong with it."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no conversations: 'conversations' missing, empty or not a list"
    if len(turns) % 2:
        return f"odd conversation: {len(turns)} messages, every question needs its answer"
    pairs = []
    for number in range(0, len(turns), 2):
        question, answer = turns[number], turns[number + 1]
        if not all(isinstance(m, dict) and isinstance(m.get("value"), str) for m in (question, answer)):
            return f"bad message: message {number + 1} or {number + 2} is not {{from, value}}"
        if (question.get("from"), answer.get("from")) != ROLES:
            return f"bad roles: messages {number + 1}-{number + 2} are not human then gpt"
        text = question["value"].replace(IMAGE_TAG, "").strip()
        if not text or not answer["value"].strip():
            return f"empty message: message {number + 1} or {number + 2} has no text"
        pairs.append([text, answer["value"].strip()])
    return pairs


class ConversationSource(AlignedSource):
    """The records of one conversation file, dealt to slots pass after pass as the aligned folder's are."""

    def __init__(self, path: str | Path, *, seed: int, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.root = Path(path).parent
        self.name = str(path)
        self.index = 0  # the only source of a conversation job
        self.seed = seed
        self.max_image_bytes = max_image_bytes
        self.annotations = read_conversations(path)
        self.annotation_file = str(path)

    def annotation_item(self, index: int, epoch: int) -> Candidate | SkippedSample:
        record = self.annotations[index]
        key = str(record.get("id", f"record {index}"))
        image = record.get("image")
        if not isinstance(image, str) or not image:
            return SkippedSample(self.annotation_file, key, "no image: 'image' missing or not a path")
        pairs = exchanges(record)
        if isinstance(pairs, str):
            return SkippedSample(self.annotation_file, key, pairs)
        path = str(self.root / image)
        data = read_listed_image(path, key, self.max_image_bytes)
        if isinstance(data, SkippedSample):
            return data
        return Candidate(source=path, key=key, image=data, text=json.dumps(pairs, ensure_ascii=False),
                         seed=stable_seed("conversation-sample", self.seed, epoch, index))


def conversation_batches(
    path: str,
    transform: ImageTransform,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
    positions: dict[str, int] | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Iterator[dict]:
    """An endless stream of conversation batches (texts: each sample's exchanges as JSON), drop_last per pass.

    Arguments as `minigpt4.data.aligned.stage2_batches`; `path` is the conversation JSON file.
    """
    check_layout(batch_size, rank, world_size, num_workers, start_batch)
    source = ConversationSource(path, seed=seed, max_image_bytes=max_image_bytes)
    return listed_batches(source, "conversations", transform, batch_size, rank=rank, world_size=world_size,
                          num_workers=num_workers, start_batch=start_batch, positions=positions)
