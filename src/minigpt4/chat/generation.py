"""Text generation from prompts with images: batched, streamed, with stop strings on every row.

The LLM input is built exactly as in training: `layout_sample` + `collate_layouts` (left padding
here) give token ids and image positions, `MiniGPT4.encode_images` the image embeddings and
`MiniGPT4.embed` writes them in. Decoding is transformers' `generate(inputs_embeds=...,
attention_mask=...)` with a KV cache; our own stopping criterion ends each row at its stop strings
(any tokenization of them) and at EOS, and finds where the generated ids start, whatever the
transformers version returns in front of them. Rows of one call may differ in `max_new_tokens` and
`stop` (the server batches requests that differ only there): the same criterion ends each row at
its own length and stop strings while the others go on. Streaming is a streamer that gets every
step's (B,) new ids and hands each row's settled text on, so a batch of streams shares one `generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tokenizers.decoders import DecodeStream
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from minigpt4.processing.prompt import IMAGE_PLACEHOLDER, collate_layouts, layout_sample, pad_token_id

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


# Sampling below this temperature decodes greedily. Dividing the logits by a tinier one overflows
# float32 (1e-45 turns every logit into inf and sampling fails on NaN probabilities), and at 1e-5
# sampling already picks the argmax unless two logits are within ~1e-4 of each other (vLLM's rule too).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class GenerationSettings:
    """How to decode. Defaults are the original demo's: sampling at temperature 1.0, top-p 0.9, 300 new
    tokens, and top-k 50, which transformers applied there without being asked.

    A temperature below `GREEDY_BELOW_TEMPERATURE` decodes greedily (the limit of sampling as the
    temperature goes to 0), so no positive temperature can fail mid-answer.
    """

    max_new_tokens: int = 300
    do_sample: bool = True  # False = greedy (or plain beam search with num_beams > 1)
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50  # 0 = off
    num_beams: int = 1
    repetition_penalty: float = 1.0  # sees the generated ids only (the prompt is given as embeddings)
    stop: list[str] = field(default_factory=list)  # on top of the template's own stop strings
    seed: int | None = None  # None = not reseeded
    max_context: int = 2000  # prompt + new tokens; longer conversations drop old turns
    max_time: float | None = None  # wall seconds for the whole call; then every unfinished row ends ("length")

    def __post_init__(self) -> None:
        # Written as `0 < x < inf` so NaN (every comparison false) fails too.
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", 0 < self.temperature < math.inf, "a finite number > 0 (use do_sample=False for greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("num_beams", self.num_beams >= 1, "at least 1"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "a finite number > 0 (1.0 turns it off)"),
            ("max_context", self.max_context >= 2, "at least 2"),
            ("max_time", self.max_time is None or 0 < self.max_time < math.inf, "None or a finite number > 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"GenerationSettings.{name}={getattr(self, name)!r} must be {expected}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"GenerationSettings.stop must hold non-empty strings, got {self.stop!r}")

    def shared(self) -> tuple:
        """What one `generate` call shares across its rows: every setting but `max_new_tokens` and
        `stop`, which each row may have its own of (under beam search, which settles rows only at the
        end, everything)."""
        per_row = () if self.num_beams > 1 else ("max_new_tokens", "stop")
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in per_row)

    def replace(self, **changes) -> GenerationSettings:
        """A copy with `changes` applied; unknown names are an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)


Settings = GenerationSettings | Sequence[GenerationSettings]  # one for every row, or one per row


def _row_settings(settings: Settings | None, count: int) -> list[GenerationSettings]:
    """Per row its settings; rows must agree on everything `GenerationSettings.shared` names."""
    if count == 0:
        raise ValueError("generate needs at least one prompt")
    if settings is None or isinstance(settings, GenerationSettings):
        return [settings or GenerationSettings()] * count
    rows = list(settings)
    if len(rows) != count:
        raise ValueError(f"got {count} prompts but settings for {len(rows)}")
    if any(row.shared() != rows[0].shared() for row in rows):
        raise ValueError("the rows of one generate call may differ only in max_new_tokens and stop "
                         "(and not at all under beam search)")
    return rows


@dataclass
class Completion:
    """One generated answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # generated tokens up to and including the one that ended the answer
    finish_reason: FinishReason


# ------------------------------------------------------------------------------------ inputs


def encode_images(model, images: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per prompt, its images' projected embeddings (n_i, Q, H); all images go through one batch."""
    flat = [image for row in images for image in row]
    if not flat:
        return [torch.empty(0) for _ in images]
    for image in flat:
        if image.dim() != 3:
            raise ValueError(f"each image must be a (3, H, W) tensor, got shape {tuple(image.shape)}")
    embeds = model.encode_images(torch.stack(flat).to(model.device))  # (N, Q, H)
    return list(torch.split(embeds, [len(row) for row in images]))


@dataclass
class PreparedInputs:
    """Left-padded LLM inputs for a batch of prompts."""

    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L)
    prompt_tokens: list[int]  # unpadded length of each row


def prepare_inputs(
    model, prompts: Sequence[str], image_embeds: Sequence[torch.Tensor], add_bos: bool = True
) -> PreparedInputs:
    """Lay out `prompts` (one `<ImageHere>` per image) and write the image embeddings in."""
    if len(prompts) != len(image_embeds):
        raise ValueError(f"got {len(prompts)} prompts but image lists for {len(image_embeds)}")
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    tokenizer = model.tokenizer
    samples = []
    for row, (prompt, embeds) in enumerate(zip(prompts, image_embeds, strict=True)):
        slots = prompt.count(IMAGE_PLACEHOLDER)
        given = embeds.shape[0] if embeds.numel() else 0
        if slots != given:
            raise ValueError(f"prompt {row} has {slots} {IMAGE_PLACEHOLDER} placeholder(s) but {given} image(s)")
        samples.append(layout_sample(tokenizer, prompt, model.num_image_tokens, add_bos=add_bos))
    batch = collate_layouts(samples, pad_token_id(tokenizer), padding_side="left").to(model.device)
    present = [e for e in image_embeds if e.numel()]
    hidden = model.llm.get_input_embeddings().embedding_dim
    stacked = torch.cat(present) if present else torch.empty(0, model.num_image_tokens, hidden, device=model.device)
    inputs_embeds = model.embed(batch, stacked.to(model.device))
    # A dispatched LLM (model.llm.device_map) embeds on its own first device, which may not be the towers'.
    attention_mask = batch.attention_mask.to(inputs_embeds.device)
    return PreparedInputs(inputs_embeds, attention_mask, [len(s.input_ids) for s in samples])


# ------------------------------------------------------------------------------------ stopping


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> list[int]:
    """EOS plus every stop string that is one special token (such as ChatML's `<|im_end|>`)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    for stop in stops:
        if stop in special:
            token_id = tokenizer.convert_tokens_to_ids(stop)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    return ids


def text_stops(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> list[str]:
    """The stop strings that are matched as text (special tokens are matched by id instead)."""
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    return list(dict.fromkeys(s for s in stops if s not in special))


@functools.lru_cache(maxsize=16)
def _stop_string_criteria(tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...]) -> StopStringCriteria:
    # Preparing it scans the whole vocabulary (~0.3 s for 49k tokens); the result is stateless, so share it.
    return StopStringCriteria(tokenizer, list(stops))


@dataclass(frozen=True)
class RowLimits:
    """What ends one row: its text stop strings, the token ids that end it, and its new-token budget."""

    stops: tuple[str, ...]
    stop_ids: tuple[int, ...]
    max_new_tokens: int


class StopCriteria(StoppingCriteria):
    """Ends each row (and its beams) on its own: at a stop string, a stop token id, its token budget,
    or when its `cancelled` event is set (its client went away).

    Stop strings are matched by transformers' `StopStringCriteria`, which works on the tokenizer's
    vocabulary: it finds a stop string however the tokens split it, also inside one token (one
    instance per distinct stop list, run on the rows that have it). The first call also records how
    many ids `generate` put in front of the new tokens (none in transformers 5 for `inputs_embeds`, a
    dummy BOS in older versions).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, rows: Sequence[RowLimits], cancelled: Sequence[threading.Event] = ()
    ):
        self.rows = list(rows)
        self.prefix_length: int | None = None
        self.cancelled = list(cancelled)
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, row in enumerate(self.rows):
            if row.stops:
                groups.setdefault(row.stops, []).append(index)
        self._strings = [(_stop_string_criteria(tokenizer, stops), members) for stops, members in groups.items()]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.prefix_length is None:
            self.prefix_length = input_ids.shape[1] - 1
        generated = input_ids.shape[1] - self.prefix_length
        beams = input_ids.shape[0] // len(self.rows)  # a row's beams are consecutive
        done = []
        for index, token_id in enumerate(input_ids[:, -1].tolist()):
            row = index // beams
            limits = self.rows[row]
            done.append(generated >= limits.max_new_tokens or token_id in limits.stop_ids
                        or (row < len(self.cancelled) and self.cancelled[row].is_set()))
        result = torch.tensor(done, dtype=torch.bool, device=input_ids.device)
        for criteria, members in self._strings:
            index = torch.tensor([row * beams + beam for row in members for beam in range(beams)],
                                 device=input_ids.device)
            result[index] |= criteria(input_ids[index], scores)
        return result


def finish(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stops: Sequence[str], eos_ids: Sequence[int]
) -> tuple[str, int, FinishReason]:
    """Generated ids -> (answer text, tokens it took, finish reason).

    The answer ends before the first EOS/stop token or stop string; special tokens are not shown;
    surrounding whitespace is stripped.
    """
    ids = list(ids)
    eos = set(eos_ids)
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    if end is not None:
        ids, count, reason = ids[:end], end + 1, "stop"
    else:
        count, reason = len(ids), "length"
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = _first_stop(text, stops)
    if cut is not None:
        text, reason = text[:cut], "stop"
        # The fewest tokens whose text already holds the stop string (the check is monotone in the length).
        low, high = 1, len(ids)
        while low < high:
            mid = (low + high) // 2
            if _first_stop(tokenizer.decode(ids[:mid], skip_special_tokens=True), stops) is not None:
                high = mid
            else:
                low = mid + 1
        count = low
    return text.strip(), count, reason


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


# ------------------------------------------------------------------------------------ decoding


def _generation_config(
    model, settings: GenerationSettings, max_new_tokens: int, eos_ids: list[int]
) -> GenerationConfig:
    # Fields left unset would be filled from the model's own generation config (e.g. top_k=50) and
    # silently change the sampling, so every one that matters is set. Greedy and plain beam search
    # run no warpers, so the sampling fields are left out there (transformers warns otherwise).
    sampled = settings.do_sample and settings.temperature >= GREEDY_BELOW_TEMPERATURE
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        max_time=settings.max_time,
        do_sample=sampled,
        num_beams=settings.num_beams,
        **(sampling if sampled else {}),
        repetition_penalty=settings.repetition_penalty,
        num_return_sequences=1,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_token_id(model.tokenizer),
        use_cache=True,
    )


def _row_limits(
    model, rows: Sequence[GenerationSettings], prompt_tokens: Sequence[int], template_stops: Sequence[str]
) -> list[RowLimits]:
    """Per row: its stop strings and ids (the template's plus its own) and its budget under max_context.

    Positions are counted per row (left padding does not move them), so each row's room is its own
    max_context minus its own prompt.
    """
    tokenizer = model.tokenizer
    # The LLM's own end-of-turn ids too (Llama-3 style models list more than the tokenizer's EOS).
    configured = getattr(model.llm.generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    limits = []
    for settings, length in zip(rows, prompt_tokens, strict=True):
        every = list(template_stops) + list(settings.stop)
        ids = stop_token_ids(tokenizer, every)
        ids += [token_id for token_id in configured if token_id not in ids]
        room = settings.max_context - length
        if room < 1:
            raise ValueError(
                f"the prompt takes {length} tokens, which leaves no room under max_context={settings.max_context}; "
                "shorten the prompt or raise max_context"
            )
        if room < settings.max_new_tokens:
            log.info("max_new_tokens lowered from %d to %d to stay within max_context", settings.max_new_tokens, room)
        limits.append(RowLimits(tuple(text_stops(tokenizer, every)), tuple(ids), min(settings.max_new_tokens, room)))
    return limits


class _Seeded:
    """Seeds torch's RNG for one generation without disturbing the caller's RNG state."""

    def __init__(self, seed: int | None, device: torch.device):
        self.seed = seed
        self.fork = torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [], device_type=device.type, enabled=seed is not None
        )

    def __enter__(self) -> None:
        self.fork.__enter__()
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        self.fork.__exit__(*exc)


def _run_generate(model, prepared: PreparedInputs, settings: GenerationSettings, criteria: StopCriteria,
                  streamer: BaseStreamer | None = None) -> torch.Tensor:
    """One `generate` over the batch; `settings` holds what the rows share, `criteria` what is per row."""
    rows = criteria.rows
    # Ids every row stops on go to transformers too; the others are the criterion's alone.
    common = [token_id for token_id in rows[0].stop_ids if all(token_id in row.stop_ids for row in rows)]
    config = _generation_config(model, settings, max(row.max_new_tokens for row in rows), common)
    # transformers warns (once) that a repetition penalty sees only the generated tokens when the
    # prompt comes as embeddings: that is intended, the original behaves the same way.
    with torch.inference_mode(), _Seeded(settings.seed, model.device):
        return model.llm.generate(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([criteria]),
            streamer=streamer,
        )


def _cancel_events(cancelled: Sequence[threading.Event] | None, count: int) -> list[threading.Event]:
    events = list(cancelled) if cancelled is not None else [threading.Event() for _ in range(count)]
    if len(events) != count:
        raise ValueError(f"got {count} prompts but cancel events for {len(events)}")
    return events


def generate_from_embeds(
    model,
    prompts: Sequence[str],
    image_embeds: Sequence[torch.Tensor],
    settings: Settings,
    *,
    cancelled: Sequence[threading.Event] | None = None,
    template_stops: Sequence[str] = (),
    add_bos: bool = True,
) -> list[Completion | None]:
    """`generate` for images already encoded with `encode_images` (cache them across turns)."""
    rows = _row_settings(settings, len(prompts))
    events = _cancel_events(cancelled, len(prompts))
    with torch.inference_mode():
        prepared = prepare_inputs(model, prompts, image_embeds, add_bos)
    limits = _row_limits(model, rows, prepared.prompt_tokens, template_stops)
    criteria = StopCriteria(model.tokenizer, limits, events)
    sequences = _run_generate(model, prepared, rows[0], criteria)
    new_ids = sequences[:, criteria.prefix_length:].tolist()  # (B, T) generated ids, finished rows padded
    completions: list[Completion | None] = []
    for ids, row, prompt_tokens, event in zip(new_ids, limits, prepared.prompt_tokens, events, strict=True):
        if event.is_set():
            completions.append(None)
            continue
        text, count, reason = finish(model.tokenizer, ids[: row.max_new_tokens], row.stops, row.stop_ids)
        completions.append(Completion(text, prompt_tokens, count, reason))
    return completions


def generate(
    model,
    prompts: Sequence[str],
    images: Sequence[Sequence[torch.Tensor]],
    settings: Settings | None = None,
    *,
    cancelled: Sequence[threading.Event] | None = None,
    template_stops: Sequence[str] = (),
    add_bos: bool = True,
) -> list[Completion | None]:
    """Answer a batch of prompts (left padding, KV cache); every row stops at its own stop strings and length.

    Args:
        model: a `MiniGPT4`.
        prompts: rendered prompts, one `<ImageHere>` per image (see `minigpt4.chat.templates`).
        images: per prompt, its (3, H, W) pixel tensors in placeholder order.
        settings: decoding settings, one for all rows or one per row (rows may differ only in
            `max_new_tokens` and `stop`; see `GenerationSettings.shared`); `stop` adds to `template_stops`.
        cancelled: per row an event; setting it (a client went away) ends that row at the next step.
        template_stops: the conversation template's stop strings (`template.stop`).
        add_bos: prepend BOS (`template.add_bos`; always true in training).

    Returns:
        Per row its Completion; None only for a row whose `cancelled` event was set.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but image lists for {len(images)}")
    with torch.inference_mode():
        image_embeds = encode_images(model, images)
    return generate_from_embeds(model, prompts, image_embeds, settings or GenerationSettings(), cancelled=cancelled,
                                template_stops=template_stops, add_bos=add_bos)


# ------------------------------------------------------------------------------------ streaming


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.lru_cache(maxsize=16)
def _run_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that leave a byte-fallback run open: the byte tokens ("<0xE2>"), and the special tokens,
    which the decode skips, so the bytes on either side form one run. Empty without byte fallback."""
    byte_ids = {i for tok, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(tok)}
    if not byte_ids:
        return frozenset()
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(byte_ids | special | set(tokenizer.all_special_ids))


class _TextDecoder:
    """A row's text as its ids arrive: `step` returns the text the new id settled, pieces that join to
    the one-shot `tokenizer.decode(ids, skip_special_tokens=True)`.

    tokenizers' `DecodeStream` does the work: it decodes only the ids since its last complete
    character (holding back split UTF-8 itself), so the work per token does not grow with the answer.
    What it does not do is done here:
    - A byte-fallback run ("<0xE2><0x82>...") decodes to one U+FFFD per byte unless the whole run is
      valid UTF-8, so the text of an open run may still change: its ids are fed with the id that closes
      it (not a special token: the decode skips those, so the bytes around one form one run).
    - Where the decode is not the Rust backend's alone (no `tokenizers` backend, or a
      `clean_up_tokenization_spaces` clean-up, which rewrites text across tokens: " n't" -> "n't"), or
      should `DecodeStream` reject a window, the whole row is decoded again per token: exact, O(T) per token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.run_ids = _run_token_ids(tokenizer)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        fits = self.backend is not None and not tokenizer.clean_up_tokenization_spaces
        self.stream = DecodeStream(skip_special_tokens=True) if fits else None
        self.ids: list[int] = []
        self.open_run = 0  # trailing ids of an open byte run, not fed yet
        self.text = ""  # what the re-decoding fallback handed out

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        if token_id in self.run_ids:
            self.open_run += 1
            return ""
        group, self.open_run = self.ids[len(self.ids) - 1 - self.open_run:], 0
        if self.stream is not None:
            try:
                return self.stream.step(self.backend, group) or ""
            except Exception as err:  # tokenizers raises a bare Exception for a window it cannot continue
                log.warning("incremental decoding failed (%s); decoding the whole answer per token from here", err)
                self.stream = None
                self.text = self._decode(self.ids[: len(self.ids) - len(group)])
        text = self._decode(self.ids)
        if len(text) <= len(self.text) or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def _decode(self, ids: list[int]) -> str:
        # An unfinished UTF-8 character decodes to U+FFFD until it is complete.
        return self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


class _RowText:
    """One row's answer as its ids arrive: hands out the text that later tokens cannot change.

    The work per token does not grow with the answer: new text comes from `_TextDecoder`, stop
    strings are looked for only where the new text could complete one, and only the text not handed
    out yet (a tail that may become a stop string, trailing whitespace) is kept as one string. The
    one-shot `finish` runs once, when the row ends, and defines the answer.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, limits: RowLimits):
        self.tokenizer = tokenizer
        self.stops, self.eos_ids, self.max_new_tokens = limits.stops, limits.stop_ids, limits.max_new_tokens
        self.decoder = _TextDecoder(tokenizer)
        self.ids: list[int] = []
        self.pieces: list[str] = []  # handed out
        self.pending = ""  # decoded, not handed out yet
        self.reach = max((len(s) - 1 for s in self.stops), default=0)  # how far back a stop string may start
        self.recent = ""  # the last `reach` characters decoded
        # A stop string or id, or the row's budget, was reached: later ids (padding) are not part of it.
        self.done = False

    def add(self, token_id: int) -> str:
        """Take one new id; return the text it settled (often empty)."""
        self.ids.append(token_id)
        self.done = len(self.ids) >= self.max_new_tokens  # the rest is handed out by `close`
        if token_id in self.eos_ids:
            self.done = True
            return self._rest(finish(self.tokenizer, self.ids, self.stops, self.eos_ids)[0])
        new = self.decoder.step(token_id)
        if not new:
            return ""
        window = self.recent + new
        if any(stop in window for stop in self.stops):
            self.done = True
            return self._rest(finish(self.tokenizer, self.ids, self.stops, self.eos_ids)[0])
        self.recent = window[len(window) - self.reach:] if self.reach else ""
        self.pending += new
        if not self.pieces:
            self.pending = self.pending.lstrip()  # the answer is stripped
        # Hold back a tail that may still become a stop string (one that starts in text handed out
        # would have been held back then, so `pending` suffices), and trailing whitespace.
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        settled = self.pending[: len(self.pending) - hold].rstrip("\ufffd").rstrip()
        if settled:
            self.pieces.append(settled)
            self.pending = self.pending[len(settled):]
        return settled

    def close(self, prompt_tokens: int) -> tuple[str, Completion]:
        """The text not handed out yet and the whole answer."""
        text, count, reason = finish(self.tokenizer, self.ids, self.stops, self.eos_ids)
        return self._rest(text), Completion(text, prompt_tokens, count, reason)

    def _rest(self, answer: str) -> str:
        """What of `answer` was not handed out yet (at the row's end: joins the pieces once)."""
        handed = "".join(self.pieces)
        if not answer.startswith(handed):
            log.warning("streamed text %r is not a prefix of the final answer %r", handed, answer)
            return ""
        self.pieces = [answer]
        return answer[len(handed):]


class _RowsStreamer(BaseStreamer):
    """Gets the (B,) ids of every decoding step from `generate`, hands each live row's new text on, and
    finishes a row (its held-back rest, then its Completion) at the step it ends, while the others go on."""

    def __init__(
        self, rows: list[_RowText], prompt_tokens: list[int], on_delta: Callable[[int, str], None],
        on_row_done: Callable[[int, Completion], None] | None, cancelled: Sequence[threading.Event],
    ):
        self.rows, self.prompt_tokens, self.cancelled = rows, prompt_tokens, cancelled
        self.on_delta, self.on_row_done = on_delta, on_row_done
        self.completions: list[Completion | None] = [None] * len(rows)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids, never new tokens
            self._prompt_seen = True
            return
        for index, token_id in enumerate(value.reshape(-1).tolist()):  # (B,) one id per row
            row = self.rows[index]
            if row.done or self.cancelled[index].is_set():
                continue
            delta = row.add(token_id)
            if delta:
                self.on_delta(index, delta)
            if row.done:
                self.finish_row(index)

    def finish_row(self, index: int) -> None:
        rest, completion = self.rows[index].close(self.prompt_tokens[index])
        if rest:
            self.on_delta(index, rest)
        self.completions[index] = completion
        if self.on_row_done is not None:
            self.on_row_done(index, completion)

    def end(self) -> None:
        pass  # rows still open are finished by `stream_batch_from_embeds` itself


def stream_batch_from_embeds(
    model,
    prompts: Sequence[str],
    image_embeds: Sequence[torch.Tensor],
    settings: Settings,
    on_delta: Callable[[int, str], None],
    *,
    cancelled: Sequence[threading.Event] | None = None,
    template_stops: Sequence[str] = (),
    add_bos: bool = True,
    on_row_done: Callable[[int, Completion], None] | None = None,
) -> list[Completion | None]:
    """`stream_batch` for images already encoded with `encode_images`."""
    settings_rows = _row_settings(settings, len(prompts))
    cancelled = _cancel_events(cancelled, len(prompts))
    if settings_rows[0].num_beams > 1:
        # Beams are only settled at the end, so there is nothing to stream before that.
        completions = generate_from_embeds(
            model, prompts, image_embeds, settings_rows, cancelled=cancelled, template_stops=template_stops,
            add_bos=add_bos,
        )
        for row, completion in enumerate(completions):
            if completion is not None and completion.text:
                on_delta(row, completion.text)
            if completion is not None and on_row_done is not None:
                on_row_done(row, completion)
        return completions
    with torch.inference_mode():
        prepared = prepare_inputs(model, prompts, image_embeds, add_bos)
    limits = _row_limits(model, settings_rows, prepared.prompt_tokens, template_stops)
    rows = [_RowText(model.tokenizer, row_limits) for row_limits in limits]
    criteria = StopCriteria(model.tokenizer, limits, cancelled)
    streamer = _RowsStreamer(rows, prepared.prompt_tokens, on_delta, on_row_done, cancelled)
    _run_generate(model, prepared, settings_rows[0], criteria, streamer)
    for index in range(len(rows)):  # rows that ran to the end of the call (max_time, or the last to end)
        if streamer.completions[index] is None and not cancelled[index].is_set():
            streamer.finish_row(index)
    return streamer.completions


def stream_batch(
    model,
    prompts: Sequence[str],
    images: Sequence[Sequence[torch.Tensor]],
    settings: Settings | None,
    on_delta: Callable[[int, str], None],
    *,
    cancelled: Sequence[threading.Event] | None = None,
    template_stops: Sequence[str] = (),
    add_bos: bool = True,
    on_row_done: Callable[[int, Completion], None] | None = None,
) -> list[Completion | None]:
    """Answer a batch of prompts as `generate` does (per-row settings too), handing out each row's text as it
    is generated.

    Runs in the calling thread: `on_delta(row, text)` is called from it after each decoding step
    for every row that settled new text, and once more when the row ends with any held-back rest, so each
    row's pieces join to exactly the text `generate` returns for it. Setting `cancelled[row]` (a
    client went away) ends that row at the next step and silences it; generation stops once every
    row has ended. `on_row_done(row, completion)` is called for every row at the step it ends (after its
    last text), while the other rows go on. With `num_beams > 1` each answer comes as one piece at the end.

    Returns:
        Per row its Completion, or None for a row whose `cancelled` event was set before it ended.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but image lists for {len(images)}")
    with torch.inference_mode():
        image_embeds = encode_images(model, images)
    return stream_batch_from_embeds(
        model, prompts, image_embeds, settings or GenerationSettings(), on_delta,
        cancelled=cancelled, template_stops=template_stops, add_bos=add_bos, on_row_done=on_row_done,
    )


def stream_from_embeds(
    model,
    prompt: str,
    image_embeds: torch.Tensor,
    settings: GenerationSettings,
    *,
    template_stops: Sequence[str] = (),
    add_bos: bool = True,
    on_finish: Callable[[Completion], None] | None = None,
) -> Iterator[str]:
    """`stream` for images already encoded; `on_finish` gets the whole Completion at the end.

    Generation runs on a thread of its own; closing the iterator early stops it at its next step.
    """
    items: queue.Queue = queue.Queue()  # text pieces, then the Completion or an exception
    cancelled = threading.Event()

    def work() -> None:
        try:
            completion = stream_batch_from_embeds(
                model, [prompt], [image_embeds], settings, lambda _row, text: items.put(text),
                cancelled=[cancelled], template_stops=template_stops, add_bos=add_bos,
            )[0]
        except BaseException as err:  # handed to the consumer, which re-raises it
            items.put(err)
        else:
            items.put(completion)

    thread = threading.Thread(target=work, name="minigpt4-generate", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, str):
                if on_finish is not None and item is not None:
                    on_finish(item)
                return
            yield item
    finally:
        cancelled.set()
        thread.join()


def stream(
    model,
    prompt: str,
    images: Sequence[torch.Tensor],
    settings: GenerationSettings | None = None,
    *,
    template_stops: Sequence[str] = (),
    add_bos: bool = True,
    on_finish: Callable[[Completion], None] | None = None,
) -> Iterator[str]:
    """Answer one prompt, yielding text pieces as they are generated (nothing after a stop string).

    The pieces join to exactly the text `generate` returns for the same settings and seed. With
    `num_beams > 1` the answer comes as one piece at the end.
    """
    settings = settings or GenerationSettings()
    with torch.inference_mode():
        embeds = encode_images(model, [list(images)])[0]
    yield from stream_from_embeds(
        model, prompt, embeds, settings, template_stops=template_stops, add_bos=add_bos, on_finish=on_finish
    )
