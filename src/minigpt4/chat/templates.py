"""Conversation templates: how a list of messages becomes the prompt text the LLM sees.

A rendered prompt marks each image with `<ImageHere>` (inside the template's own image tags), so
`minigpt4.processing.prompt.layout_sample` lays it out exactly as training does. The styles:

- `vicuna_v0`: the released MiniGPT-4 chat format,
  `<system>###Human: <Img><ImageHere></Img> question###Assistant:` (no space around "###"; a
  finished turn continues ` answer###Human: ...`).
- `vicuna_v0_train`: the stage-2 training prompt `###Human: <Img><ImageHere></Img> question ###Assistant: `.
- `caption`: the stage-1 layout, the image alone then the caption (the question text is not used).
- `llama2`: the Llama-2 release, `<system><s>[INST] <Img><ImageHere></Img> question [/INST] ` (a finished
  turn continues `answer<s>[INST] ...`); answers end with EOS.
- `chat_template`: the tokenizer's own Jinja chat template (ChatML for SmolLM2, Qwen, ...).

`fit_messages` drops whole old turns until a conversation fits the context; the system text, the
BOS token and every image that stays are always laid out whole.
"""

from __future__ import annotations

import abc
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from minigpt4.processing.prompt import IMAGE_PLACEHOLDER, VICUNA_V0_TEMPLATE, PiecedPrompt, layout_sample

log = logging.getLogger(__name__)

Role = Literal["user", "assistant"]

# Our own wording. The released weights were trained without any system text, so its exact words
# do not matter for them; it only has to say where the image is and what to do.
DEFAULT_SYSTEM = (
    "An image is shared with you as <Img>ImageContent</Img>, and you can see it as soon as the user "
    "provides it. Answer the user's questions about it helpfully and accurately."
)

VICUNA_IMAGE = f"<Img>{IMAGE_PLACEHOLDER}</Img>"


@dataclass
class Message:
    """One conversation message. `images` images come first, then the text."""

    role: Role
    text: str = ""
    images: int = 0

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"Message.role must be 'user' or 'assistant', got {self.role!r}")
        if self.images < 0:
            raise ValueError(f"Message.images must be >= 0, got {self.images}")
        if self.role == "assistant" and self.images:
            raise ValueError("only user messages can carry images")
        if IMAGE_PLACEHOLDER in self.text:
            raise ValueError(f"message text may not contain the image placeholder {IMAGE_PLACEHOLDER!r}")


def _check_roles(messages: Sequence[Message]) -> None:
    if not messages or messages[0].role != "user":
        raise ValueError("a conversation must start with a user message")
    for before, after in itertools.pairwise(messages):
        if before.role == after.role:
            raise ValueError(f"roles must alternate user/assistant, got two {after.role!r} messages in a row")


class ConversationTemplate(abc.ABC):
    """Renders messages to prompt text; subclasses define the format.

    Attributes:
        name: the template's name (see `TEMPLATES`).
        stop: strings that end an answer; generation stops on them and cuts them off.
        add_bos: whether the layout prepends the tokenizer's BOS token (always, as in training).
        default_system: the system text used when `render` gets `system=None`.
    """

    name: str = ""
    stop: list[str]
    add_bos: bool = True
    default_system: str = DEFAULT_SYSTEM

    def render(self, messages: Sequence[Message], system: str | None = None) -> str:
        """The prompt for `messages`; ending with a user message adds the cue for the assistant's answer.

        Args:
            messages: alternating user/assistant messages, starting with a user message.
            system: the system text; None uses `default_system`, "" means none.
        """
        _check_roles(messages)
        return self._render(messages, self.default_system if system is None else system)

    @abc.abstractmethod
    def _render(self, messages: Sequence[Message], system: str) -> str:
        """The format itself: messages (roles already checked) and the resolved system text."""

    def user_content(self, message: Message) -> str:
        """A user message's content: its images' tags, then the text, separated by spaces."""
        return " ".join([VICUNA_IMAGE] * message.images + ([message.text] if message.text else []))


class VicunaV0Template(ConversationTemplate):
    """MiniGPT-4's release format: `system###Human: text###Assistant: text###...###Assistant:`."""

    name = "vicuna_v0"
    sep = "###"
    roles = {"user": "Human", "assistant": "Assistant"}

    def __init__(self) -> None:
        self.stop = [self.sep]

    def _render(self, messages: Sequence[Message], system: str) -> str:
        parts = [system + self.sep]
        for message in messages:
            content = self.user_content(message) if message.role == "user" else message.text
            parts.append(f"{self.roles[message.role]}: {content}{self.sep}")
        if messages[-1].role == "user":
            parts.append(f"{self.roles['assistant']}:")
        return "".join(parts)


class VicunaV0TrainTemplate(VicunaV0Template):
    """The stage-2 training prompt, `###Human: <Img><ImageHere></Img> question ###Assistant: `.

    The release's chat format differs from what stage 2 trained on (a space before "###Assistant",
    a trailing space, no system text); this one matches training, for models fine-tuned with
    `VICUNA_V0_TEMPLATE`. A finished turn continues `answer###Human: ...`, as training's end_sym "###".
    """

    name = "vicuna_v0_train"
    default_system = ""

    def _render(self, messages: Sequence[Message], system: str) -> PiecedPrompt:
        # The pieces training tokenizes apart (`conversation_turns`): each question's prompt, and each answer with
        # the "###" that ends it (taken off the next prompt), so that a history is read in training's tokens.
        pieces = [system]
        for message in messages:
            if message.role == "user":
                prompt = VICUNA_V0_TEMPLATE.format(self.user_content(message))
                if len(pieces) > 1:  # after an answer: its end symbol is this prompt's "###"
                    pieces[-1] += self.sep
                    prompt = prompt[len(self.sep):]
                pieces.append(prompt)
            else:
                pieces.append(message.text)
        return PiecedPrompt([pieces[0] + pieces[1], *pieces[2:]])


class CaptionTemplate(ConversationTemplate):
    """The stage-1 layout, `<ImageHere>` then the caption: for models trained on captions only.

    Such a model takes no instructions, so a user message contributes its images and not its text;
    a finished answer ends with the stage-1 end symbol "\n", which also ends generation.
    """

    name = "caption"
    default_system = ""

    def __init__(self) -> None:
        self.stop = ["\n"]

    def _render(self, messages: Sequence[Message], system: str) -> str:
        parts = [system]
        for message in messages:
            parts.append(IMAGE_PLACEHOLDER * message.images if message.role == "user" else message.text + "\n")
        return "".join(parts)


class Llama2Template(ConversationTemplate):
    """The Llama-2 release of MiniGPT-4 (its `CONV_VISION_LLama2`): the system text, then each user
    message as `<s>[INST] content` and each answer as ` [/INST] answer`, with nothing between them:
    `system<s>[INST] <Img><ImageHere></Img> question [/INST] answer<s>[INST] next [/INST] `.

    The layout prepends the tokenizer's BOS to the first piece only (as the release tokenizes it); the
    `<s>` written in the text is the BOS token too. An answer ends with EOS, where generation stops.
    """

    name = "llama2"
    user, assistant = "[INST] ", " [/INST] "

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.bos = tokenizer.bos_token or "<s>"
        self.stop = [tokenizer.eos_token] if tokenizer.eos_token else []

    def _render(self, messages: Sequence[Message], system: str) -> str:
        parts = [system]
        for message in messages:
            if message.role == "user":
                parts.append(self.bos + self.user + self.user_content(message))
            else:
                parts.append(self.assistant + message.text)
        if messages[-1].role == "user":
            parts.append(self.assistant)
        return "".join(parts)


class TokenizerChatTemplate(ConversationTemplate):
    """The tokenizer's own Jinja chat template, with image tags inside the user text."""

    name = "chat_template"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template 'chat_template' needs a tokenizer with a chat template, but {type(tokenizer).__name__} "
                "has none; use template 'vicuna_v0' or 'llama2'"
            )
        self.tokenizer = tokenizer
        # The end-of-turn token ends an answer; it is usually the EOS, which generation also stops on.
        self.stop = [tokenizer.eos_token] if tokenizer.eos_token else []

    def _render(self, messages: Sequence[Message], system: str) -> str:
        chat = [{"role": "system", "content": system}] if system else []
        for message in messages:
            content = self.user_content(message) if message.role == "user" else message.text
            chat.append({"role": message.role, "content": content})
        text = self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=messages[-1].role == "user"
        )
        bos = self.tokenizer.bos_token
        # The layout prepends BOS as a token (as training does); don't repeat it as text.
        if bos and text.startswith(bos):
            text = text[len(bos):]
        return text


TEMPLATE_NAMES = ("vicuna_v0", "vicuna_v0_train", "caption", "llama2", "chat_template")


def get_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ConversationTemplate:
    """The template called `name` (one of `TEMPLATE_NAMES`) for `tokenizer`."""
    if name == "vicuna_v0":
        return VicunaV0Template()
    if name == "vicuna_v0_train":
        return VicunaV0TrainTemplate()
    if name == "caption":
        return CaptionTemplate()
    if name == "llama2":
        return Llama2Template(tokenizer)
    if name == "chat_template":
        return TokenizerChatTemplate(tokenizer)
    raise ValueError(f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")


def prompt_length(
    template: ConversationTemplate,
    messages: Sequence[Message],
    system: str | None,
    tokenizer: PreTrainedTokenizerBase,
    num_image_tokens: int,
) -> int:
    """Tokens the rendered conversation takes in the LLM input, BOS and image positions included."""
    prompt = template.render(messages, system)
    return len(layout_sample(tokenizer, prompt, num_image_tokens, add_bos=template.add_bos).input_ids)


def _turns(messages: Sequence[Message]) -> list[list[int]]:
    """Message indices grouped into turns: a user message and the answer that follows it."""
    turns: list[list[int]] = []
    for index, message in enumerate(messages):
        if message.role == "user":
            turns.append([index])
        else:
            turns[-1].append(index)
    return turns


def fit_messages(
    template: ConversationTemplate,
    messages: Sequence[Message],
    system: str | None,
    tokenizer: PreTrainedTokenizerBase,
    num_image_tokens: int,
    budget: int,
) -> list[int]:
    """Indices of the messages to keep so the prompt takes at most `budget` tokens.

    Whole turns are dropped, oldest first: turns without images before turns with images, so the
    picture being discussed stays as long as possible. The system text, the BOS token and the last
    turn are never dropped, and an image is either kept whole or dropped with its turn.

    Raises:
        ValueError: when even the system text plus the last turn (and its images) exceed `budget`.
    """
    _check_roles(messages)
    turns = _turns(messages)
    kept = list(range(len(turns)))

    def length() -> int:
        chosen = [messages[i] for t in kept for i in turns[t]]
        return prompt_length(template, chosen, system, tokenizer, num_image_tokens)

    current = length()
    if current <= budget:
        return list(range(len(messages)))
    droppable = [t for t in kept[:-1] if messages[turns[t][0]].images == 0]
    droppable += [t for t in kept[:-1] if messages[turns[t][0]].images > 0]
    for turn in droppable:
        kept.remove(turn)
        if messages[turns[turn][0]].images:
            log.warning("dropping an old turn with %d image(s) to fit the context", messages[turns[turn][0]].images)
        current = length()
        if current <= budget:
            break
    if current > budget:
        raise ValueError(
            f"the last message alone needs {current} prompt tokens but only {budget} fit "
            "(max_context minus max_new_tokens); shorten the message, lower max_new_tokens or raise max_context"
        )
    dropped = len(turns) - len(kept)
    log.info("dropped %d old turn(s) to fit %d prompt tokens", dropped, budget)
    return [i for t in kept for i in turns[t]]
