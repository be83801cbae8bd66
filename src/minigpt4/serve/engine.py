"""The model side of the server: OpenAI messages -> prompt + image tensors, and the calls into generation.

Rendering and generation are the chat package's (`minigpt4.chat.templates`, `minigpt4.chat.generation`);
this module only adapts the OpenAI message list to them and counts tokens for the limits.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from minigpt4.chat import generation
from minigpt4.chat.generation import Completion, Settings
from minigpt4.chat.templates import Message, get_template
from minigpt4.model.minigpt4 import MiniGPT4
from minigpt4.processing.image import eval_transform
from minigpt4.processing.prompt import IMAGE_PLACEHOLDER, layout_sample


@dataclass
class Conversation:
    """An OpenAI message list reduced to what the template renders."""

    messages: list[Message]
    system: str | None


def to_conversation(turns: list[tuple[str, str, int]], default_system: str | None) -> Conversation:
    """(role, text, images) triples in OpenAI order -> alternating user/assistant messages.

    System (and "developer") texts are joined into the system prompt. Consecutive messages of the
    same role are merged, because clients send them but the templates need strict alternation.

    Raises:
        ValueError: the conversation does not start with a user message (after system texts), does
            not end with one, or uses the image placeholder as text.
    """
    system_parts: list[str] = []
    # (role, texts, images) per merged message; texts are joined once at the end, so merging a run
    # of k messages costs O(total length), not O(k * length) as repeated concatenation would.
    merged: list[tuple[str, list[str], int]] = []
    for role, text, images in turns:
        if IMAGE_PLACEHOLDER in text:
            raise ValueError(f"message text may not contain the image placeholder {IMAGE_PLACEHOLDER!r}")
        if role in ("system", "developer"):
            system_parts.append(text)
        elif merged and merged[-1][0] == role:
            _, texts, count = merged[-1]
            texts.append(text)
            merged[-1] = (role, texts, count + images)
        else:
            merged.append((role, [text], images))
    messages = [Message(role=role, text="\n".join(t for t in texts if t), images=count)  # type: ignore[arg-type]
                for role, texts, count in merged]
    if not messages or messages[0].role != "user":
        raise ValueError("the conversation must start with a user message (after any system messages)")
    if messages[-1].role != "user":
        raise ValueError("the last message must come from the user; it is the one answered")
    system = "\n".join(system_parts) if system_parts else default_system
    return Conversation(messages, system)


class ModelEngine:
    """A loaded MiniGPT-4 with its conversation template, decoding defaults, image transform and generation calls.

    `render`, `count_tokens` and `pixels` run on request threads; `generate` and `stream_batch` only on
    the scheduler's worker thread (the model is not thread-safe).
    """

    def __init__(self, model: MiniGPT4, template: str | None = None, system: str | None = None):
        """`template` None: the model's (`model.chat_defaults`), with its system text unless `system` is
        given; requests without a system message get `system`. Decoding defaults are the model's too."""
        self.model = model
        talk = model.chat_defaults
        if template is None:
            template, system = talk.template, talk.system if system is None else system
        self.template = get_template(template, model.tokenizer)
        self.system = system
        self.generation = talk.generation  # what a request leaves out
        # Request threads tokenize while the worker generates: give them their own tokenizer.
        self._tokenizer = copy.deepcopy(model.tokenizer)
        # No token covers more characters than the longest vocabulary piece; see `min_tokens`.
        self._longest_piece = max(len(piece) for piece in self._tokenizer.get_vocab())
        self.transform = eval_transform(model.config.vision.image_size)

    def render(self, conversation: Conversation) -> str:
        return self.template.render(conversation.messages, conversation.system)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens `text` takes, without tokenizing it (rejects huge prompts cheaply)."""
        return len(text) // (2 * self._longest_piece)  # 2x slack for normalisers that shorten text

    def count_tokens(self, prompt: str) -> int:
        """Prompt length in LLM positions: BOS, text tokens and every image's query tokens."""
        laid = layout_sample(self._tokenizer, prompt, self.model.num_image_tokens, add_bos=self.template.add_bos)
        return len(laid.input_ids)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) normalised pixels, the eval transform the model was trained with."""
        return self.transform(image)

    def generate(
        self, prompts: list[str], images: list[list[torch.Tensor]], settings: Settings,
        cancelled: list[threading.Event] | None = None,
    ) -> list[Completion | None]:
        return generation.generate(self.model, prompts, images, settings, cancelled=cancelled,
                                   template_stops=self.template.stop, add_bos=self.template.add_bos)

    def stream_batch(
        self, prompts: list[str], images: list[list[torch.Tensor]], settings: Settings,
        on_delta: Callable[[int, str], None], cancelled: list[threading.Event],
        on_row_done: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion | None]:
        return generation.stream_batch(self.model, prompts, images, settings, on_delta, cancelled=cancelled,
                                       template_stops=self.template.stop, add_bos=self.template.add_bos,
                                       on_row_done=on_row_done)
