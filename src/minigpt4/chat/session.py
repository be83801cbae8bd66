"""`Chat`: one conversation about one or more images, the way the MiniGPT-4 demo holds it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

from minigpt4.chat.generation import (
    Completion,
    GenerationSettings,
    encode_images,
    generate_from_embeds,
    stream_from_embeds,
)
from minigpt4.chat.templates import ConversationTemplate, Message, fit_messages, get_template
from minigpt4.processing.image import load_image

log = logging.getLogger(__name__)

ImageInput = str | Path | bytes | Image.Image | torch.Tensor


class Chat:
    """A conversation with a MiniGPT-4 model.

    Images are encoded once, at `upload`; every answer re-renders the whole conversation with the
    template and lays it out like training does. Old turns are dropped whole when the conversation
    outgrows `settings.max_context`.

    Args:
        model: a `MiniGPT4`.
        image_processor: PIL image -> (3, H, W) tensor, e.g. `eval_transform(model.config.vision.image_size)`.
        template: a template name (see `TEMPLATE_NAMES`) or a `ConversationTemplate`; None: the one the
            model records (`model.chat_defaults`), with its system text unless `system` is given.
        system: the system text; None uses the template's default, "" means none.
        settings: default decoding settings (None: the model's); keyword arguments of `answer`/`stream`
            override them.
    """

    def __init__(
        self,
        model,
        image_processor: Callable[[Image.Image], torch.Tensor],
        template: str | ConversationTemplate | None = None,
        system: str | None = None,
        settings: GenerationSettings | None = None,
    ):
        self.model = model
        self.image_processor = image_processor
        if template is None:
            template = model.chat_defaults.template
            system = model.chat_defaults.system if system is None else system
        self.template = get_template(template, model.tokenizer) if isinstance(template, str) else template
        self.system = system
        self.settings = settings or model.chat_defaults.generation
        self.messages: list[Message] = []
        self._image_embeds: list[torch.Tensor] = []  # one (Q, H) tensor per image, in conversation order
        self.last_completion: Completion | None = None

    # ------------------------------------------------------------------ conversation

    def reset(self) -> None:
        """Forget the conversation and its images."""
        self.messages.clear()
        self._image_embeds.clear()
        self.last_completion = None

    def upload(self, image: ImageInput) -> str:
        """Add an image to the user's next message.

        Args:
            image: a path, encoded bytes, a PIL image, or a (3, H, W) / (1, 3, H, W) tensor already processed.

        Raises:
            ImageError: the file or bytes are not a readable image.
        """
        if isinstance(image, torch.Tensor):
            pixels = image.squeeze(0) if image.dim() == 4 and image.shape[0] == 1 else image
        else:
            pixels = self.image_processor(load_image(image))
        with torch.inference_mode():
            embeds = encode_images(self.model, [[pixels]])[0]  # (1, Q, H)
        self._image_embeds.append(embeds[0])
        pending = self._pending_user()
        pending.images += 1
        return "Received."

    def ask(self, text: str) -> None:
        """Add the user's text to their next message (after any images just uploaded)."""
        text = text.strip()
        if not text:
            raise ValueError("the question is empty")
        pending = self._pending_user()
        pending.text = f"{pending.text} {text}" if pending.text else text

    def withdraw_question(self) -> None:
        """Remove the unanswered question's text (its images stay), e.g. after it did not fit the context."""
        if self.messages and self.messages[-1].role == "user":
            if self.messages[-1].images:
                self.messages[-1].text = ""
            else:
                self.messages.pop()

    def _pending_user(self) -> Message:
        if not self.messages or self.messages[-1].role == "assistant":
            self.messages.append(Message("user"))
        return self.messages[-1]

    def prompt(self) -> str:
        """The prompt text of the whole conversation, as it would be rendered now (before truncation)."""
        return self.template.render(self.messages, self.system)

    # ------------------------------------------------------------------ answering

    def _fitted(self, settings: GenerationSettings) -> tuple[str, torch.Tensor]:
        """The rendered prompt and image embeddings of the turns that fit the context."""
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("nothing to answer: upload an image or ask a question first")
        budget = settings.max_context - settings.max_new_tokens
        keep = fit_messages(
            self.template, self.messages, self.system, self.model.tokenizer, self.model.num_image_tokens, budget
        )
        first_image = []  # index of each message's first image in self._image_embeds
        count = 0
        for message in self.messages:
            first_image.append(count)
            count += message.images
        kept_images = [
            embeds
            for i in keep
            for embeds in self._image_embeds[first_image[i] : first_image[i] + self.messages[i].images]
        ]
        prompt = self.template.render([self.messages[i] for i in keep], self.system)
        embeds = torch.stack(kept_images) if kept_images else torch.empty(0)  # (n, Q, H)
        return prompt, embeds

    def _settings(self, overrides: dict) -> GenerationSettings:
        return self.settings.replace(**overrides) if overrides else self.settings

    def answer(self, **generation) -> str:
        """Generate the assistant's answer, add it to the conversation and return it.

        Keyword arguments override `GenerationSettings` fields (e.g. `do_sample=False`, `num_beams=3`).
        """
        settings = self._settings(generation)
        prompt, embeds = self._fitted(settings)
        completion = generate_from_embeds(
            self.model, [prompt], [embeds], settings, template_stops=self.template.stop, add_bos=self.template.add_bos
        )[0]
        self._record(completion)
        return completion.text

    def stream(self, **generation) -> Iterator[str]:
        """Like `answer`, yielding the answer in pieces; the conversation gets the answer when it ends.

        Closing the iterator early stops generation and keeps the part shown so far as the answer.
        """
        settings = self._settings(generation)
        prompt, embeds = self._fitted(settings)
        shown: list[str] = []
        finished: list[Completion] = []
        try:
            for piece in stream_from_embeds(
                self.model,
                prompt,
                embeds,
                settings,
                template_stops=self.template.stop,
                add_bos=self.template.add_bos,
                on_finish=finished.append,
            ):
                shown.append(piece)
                yield piece
        finally:
            if finished:
                self._record(finished[0])
            else:
                self.messages.append(Message("assistant", "".join(shown).strip()))

    def _record(self, completion: Completion) -> None:
        self.last_completion = completion
        self.messages.append(Message("assistant", completion.text))
