"""The one place that lays out a sample for the LLM, for training and for chat alike.

    [BOS][text before image][image embeddings x Q][text after image]...[target + end_sym][padding]

Each text segment between images is tokenized on its own without special tokens (the original
does the same, so SentencePiece gives each piece its own leading "▁"). Image positions are marked
in `image_mask`; the model writes the projected image embeddings there. Labels are -100 everywhere
except the target tokens. Token ids always come from the tokenizer, never from constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = "<ImageHere>"
IGNORE_INDEX = -100

# Stage-2 instruction template of the released model (note the trailing space).
VICUNA_V0_TEMPLATE = "###Human: {} ###Assistant: "
# The Llama-2 release's stage-2 template; its end symbol "</s>" is tokenized to the EOS id, which is learned
# because that release pads with another token ("$$").
LLAMA2_TEMPLATE = "[INST] {} [/INST] "


class PiecedPrompt(str):
    """A prompt that is tokenized piece by piece: as a `str` it is the whole text, but `layout_sample` tokenizes
    each of `pieces` on its own, as training tokenizes a conversation (each prompt and each answer + end_sym apart).

    A chat history rendered as one string would merge text across those boundaries (a prompt's trailing space
    into the next answer's first word), so the model would read its own earlier answers in tokens it never
    trained on. A template whose training layout is known renders this instead of a plain string.
    """

    pieces: tuple[str, ...]

    def __new__(cls, pieces: Sequence[str]) -> PiecedPrompt:
        prompt = super().__new__(cls, "".join(pieces))
        prompt.pieces = tuple(pieces)
        return prompt


@dataclass
class LaidOut:
    """One sample, before padding."""

    input_ids: list[int]
    labels: list[int]
    image_mask: list[bool]


@dataclass
class LayoutBatch:
    """A padded batch: every tensor is (B, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "LayoutBatch":
        return LayoutBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.image_mask)))


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (what MiniGPT-4 sets)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return pad


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def layout_sample(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    num_image_tokens: int,
    target: str | None = None,
    end_sym: str = "",
    max_target_len: int | None = None,
    add_bos: bool = True,
) -> LaidOut:
    """Lay out one sample: one prompt and its target (a conversation of one turn, see `layout_conversation`).

    Args:
        prompt: text with one `<ImageHere>` per image ("<ImageHere>" alone for stage 1).
        num_image_tokens: positions each image takes (the Q-Former's query count).
        target: the text to learn (caption or answer); None for generation.
        end_sym: appended to the target ("\\n" in stage 1, "###" in stage 2, "</s>" in the Llama-2 stage 2).
        max_target_len: truncation of target + end_sym in tokens (so end_sym can be cut, as in the original).
        add_bos: prepend the tokenizer's BOS token when it has one.

    A `PiecedPrompt` (a chat history, for generation) is tokenized piece by piece.
    """
    if isinstance(prompt, PiecedPrompt) and len(prompt.pieces) > 1:
        if target is not None:
            raise ValueError("a PiecedPrompt is a chat history for generation; it takes no target")
        turns: list[tuple[str, str | None]] = [(piece, "") for piece in prompt.pieces[:-1]]
        return layout_conversation(tokenizer, [*turns, (prompt.pieces[-1], None)], num_image_tokens,
                                   add_bos=add_bos)
    return layout_conversation(tokenizer, [(prompt, target)], num_image_tokens, end_sym, max_target_len, add_bos)


def layout_conversation(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[tuple[str, str | None]],
    num_image_tokens: int,
    end_sym: str = "",
    max_target_len: int | None = None,
    add_bos: bool = True,
) -> LaidOut:
    """Lay out a conversation: per turn its prompt, then its answer + `end_sym` as a target.

    Each prompt is split at its `<ImageHere>`s and each piece tokenized on its own; each answer + end_sym is
    tokenized on its own and is the only text with labels, so a multi-turn sample learns every answer and
    none of the prompts. A None answer (the turn being asked, in generation) must be the last turn.
    `max_target_len` truncates each answer + end_sym, in tokens.
    """
    pad = pad_token_id(tokenizer)
    input_ids: list[int] = []
    image_mask: list[bool] = []
    labels: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        image_mask.append(False)
        labels.append(IGNORE_INDEX)
    for number, (prompt, target) in enumerate(turns, 1):
        if target is None and number < len(turns):
            raise ValueError(f"turn {number} of {len(turns)} has no answer: only the last turn may be unanswered")
        start = len(input_ids)
        segments = prompt.split(IMAGE_PLACEHOLDER)
        for index, segment in enumerate(segments):
            ids = _encode(tokenizer, segment)
            input_ids += ids
            image_mask += [False] * len(ids)
            if index < len(segments) - 1:
                input_ids += [pad] * num_image_tokens  # placeholders; the model overwrites these embeddings
                image_mask += [True] * num_image_tokens
        labels += [IGNORE_INDEX] * (len(input_ids) - start)
        if target is not None:
            target_ids = _encode(tokenizer, target + end_sym)
            if max_target_len is not None:
                target_ids = target_ids[:max_target_len]
            input_ids += target_ids
            image_mask += [False] * len(target_ids)
            # Pad-id tokens of the target are not learned: with pad == eos (the Vicuna v0 releases) a genuine
            # eos is not learned either; with a distinct pad (the Llama-2 release's "$$") it is.
            labels += [IGNORE_INDEX if t == pad else t for t in target_ids]
    return LaidOut(input_ids, labels, image_mask)


def conversation_turns(
    template: str, exchanges: Sequence[tuple[str, str]], end_sym: str, image_first: str = IMAGE_PLACEHOLDER
) -> list[tuple[str, str]]:
    """The (prompt, answer) turns of a training conversation, for `layout_conversation`.

    Each question is wrapped in `template` (e.g. "###Human: {} ###Assistant: "); the first one starts with
    `image_first` (the image, e.g. "<Img><ImageHere></Img>") and a space. When the template starts with
    `end_sym` (Vicuna's "###"), the answer's end_sym is also the next turn's separator and is not repeated, so
    the text is what the chat template renders for the same messages ("...answer###Human: next ###Assistant: ").
    """
    if template.count("{}") != 1:
        raise ValueError(f"the prompt template must contain exactly one '{{}}', got {template!r}")
    turns = []
    for number, (question, answer) in enumerate(exchanges):
        prompt = template.replace("{}", f"{image_first} {question}" if number == 0 else question)
        if number > 0 and end_sym and prompt.startswith(end_sym):
            prompt = prompt[len(end_sym):]
        turns.append((prompt, answer))
    return turns


def collate_layouts(
    samples: Sequence[LaidOut], pad_id: int, padding_side: str = "right"
) -> LayoutBatch:
    """Pad samples to the longest: right padding for training, left for batched generation."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, span] = 1
        labels[row, span] = torch.tensor(sample.labels, dtype=torch.long)
        image_mask[row, span] = torch.tensor(sample.image_mask, dtype=torch.bool)
    return LayoutBatch(input_ids, attention_mask, labels, image_mask)


def layout_batch(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    num_image_tokens: int,
    prompt: str | None = None,
    end_sym: str = "\n",
    max_txt_len: int = 32,
) -> LayoutBatch:
    """A training batch: one image per sample, the same prompt for the whole batch (as the original).

    `prompt` is the full prompt with `<ImageHere>` (already formatted with the template); None
    means stage 1, where the image comes right after BOS.
    """
    prompt = IMAGE_PLACEHOLDER if prompt is None else prompt
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"a training prompt needs exactly one {IMAGE_PLACEHOLDER}, got {prompt!r}")
    samples = [
        layout_sample(tokenizer, prompt, num_image_tokens, target=t, end_sym=end_sym, max_target_len=max_txt_len)
        for t in texts
    ]
    return collate_layouts(samples, pad_token_id(tokenizer), padding_side="right")
