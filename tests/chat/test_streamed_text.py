"""Streamed text, token by token: the pieces join to the one-shot decode, and the work per token is constant."""

from __future__ import annotations

import logging
import random

import pytest

from minigpt4.chat import generation
from minigpt4.chat.generation import RowLimits, _RowText, finish, stop_token_ids, text_stops

STOPS = ["###", "<|im_end|>", "</s>"]
# Text made of pieces whose ids are joined: emoji and CJK split over byte tokens (SmolLM2's byte-level BPE
# and the tiny SentencePiece's byte fallback), a stop string split over tokens, whitespace at both ends.
CASES = [
    ["  Hi 😀 猫が好き", "。 naïve café"],
    ["🎉🎉", "你好", "\n\n", "end"],
    ["the cat sat ", "##", "#", " in in in"],
    ["a #", "# b", "###", " after"],
    ["trailing space   "],
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from minigpt4.embedded import prepare_smollm2
    from minigpt4.model.llm import load_tokenizer

    return load_tokenizer(prepare_smollm2())


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llm_dir):
    from minigpt4.model.llm import load_tokenizer

    return load_tokenizer(tiny_llm_dir)


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("smollm2_tokenizer")


def _limits(tokenizer, max_new_tokens: int) -> RowLimits:
    return RowLimits(tuple(text_stops(tokenizer, STOPS)), tuple(stop_token_ids(tokenizer, STOPS)), max_new_tokens)


def _stream(tokenizer, ids: list[int]) -> tuple[list[str], str, generation.Completion]:
    """Feed `ids` as the streamer does (until the row is done); check every prefix on the way."""
    limits = _limits(tokenizer, len(ids))
    row = _RowText(tokenizer, limits)
    answer = finish(tokenizer, ids, limits.stops, limits.stop_ids)[0]
    pieces = []
    for token_id in ids:
        if row.done:
            break
        pieces.append(row.add(token_id))
        assert answer.startswith("".join(pieces)), (pieces, answer)
    rest, completion = row.close(prompt_tokens=0)
    return pieces, rest, completion


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_streamed_pieces_join_to_the_one_shot_answer(tokenizer, case):
    ids = [i for text in case for i in tokenizer.encode(text, add_special_tokens=False)]
    pieces, rest, completion = _stream(tokenizer, ids)
    assert "".join(pieces) + rest == completion.text
    assert not any("###" in piece for piece in pieces)
    assert completion.text == tokenizer.decode(ids, skip_special_tokens=True).split("###")[0].strip()
    if tokenizer.name_or_path.endswith("smollm2-135m-instruct"):  # byte-level BPE: ids of pieces join to their text
        joined = "".join(case)
        assert completion.text == joined.split("###")[0].strip()


def test_text_is_handed_out_as_it_settles(tiny_tokenizer):
    """Not all at the end: a byte run is held until it closes, a possible stop-string start until it cannot be one."""
    tok = tiny_tokenizer
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in ["▁n", "a", "<0xC3>", "<0xAF>", "ve", "##", "▁c", "##", "#", "▁in"]]
    row = _RowText(tok, _limits(tok, 20))
    assert [row.add(i) for i in ids[:9]] == ["n", "a", "", "", "ïve", "", "## c", "", ""]
    assert row.done  # "##" + "#" made the stop string
    assert row.close(prompt_tokens=3) == ("", generation.Completion("naïve## c", 3, 9, "stop"))


@pytest.mark.parametrize("seed", range(6))
def test_random_ids_stream_as_the_one_shot_decode(tokenizer, seed):
    """Any ids, special and byte tokens included (an open byte run that turns invalid, lone
    continuation bytes, skipped special tokens), join to the one-shot decode."""
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    bytes_ = [i for t, i in vocab.items() if t.startswith("<0x")] or [i for t, i in vocab.items() if len(t) == 1]
    special = [i for i in tokenizer.all_special_ids if i not in _limits(tokenizer, 1).stop_ids]
    ids = [rng.choice(bytes_) if rng.random() < 0.4 else rng.choice(special) if rng.random() < 0.05
           else rng.randrange(len(tokenizer)) for _ in range(80)]
    ids = [i for i in ids if i not in _limits(tokenizer, 1).stop_ids]
    pieces, rest, completion = _stream(tokenizer, ids)
    assert "".join(pieces) + rest == completion.text
    assert completion.text == tokenizer.decode(ids, skip_special_tokens=True).split("###")[0].strip()


class _CountingStream:
    """tokenizers' DecodeStream, counting the ids it is fed."""

    fed = 0

    def __init__(self, **kwargs):
        from tokenizers.decoders import DecodeStream

        self.stream = DecodeStream(**kwargs)

    def step(self, backend, ids):
        _CountingStream.fed += len(ids) if isinstance(ids, list) else 1
        return self.stream.step(backend, ids)


@pytest.mark.parametrize("length", [64, 512])
def test_work_per_token_does_not_grow_with_the_answer(tokenizer, monkeypatch, length):
    """Each id is fed to the incremental decoder once and nothing decodes the whole row until it ends:
    the old streamer decoded all T ids twice per token (T^2 ids per answer)."""
    monkeypatch.setattr(generation, "DecodeStream", _CountingStream)
    _CountingStream.fed = 0
    decoded = []
    original = type(tokenizer).decode
    monkeypatch.setattr(type(tokenizer), "decode", lambda self, ids, **kw: decoded.append(len(ids)) or
                        original(self, ids, **kw))
    words = tokenizer.encode(" the cat 猫 sat on 😀 a mat", add_special_tokens=False)
    ids = (words * length)[:length]
    row = _RowText(tokenizer, _limits(tokenizer, length + 1))
    for token_id in ids:
        row.add(token_id)
    assert _CountingStream.fed == length and decoded == []
    rest, completion = row.close(prompt_tokens=0)
    assert decoded == [length]  # the one-shot decode that defines the answer, once
    assert "".join(row.pieces) == completion.text


def test_clean_up_tokenizers_and_rejected_windows_fall_back_to_re_decoding(tiny_tokenizer, monkeypatch, caplog):
    """A decode with clean-up (" n't" -> "n't" across tokens) is not the backend's alone; a window
    DecodeStream rejects switches that row to re-decoding. Both still join to the one-shot answer."""
    ids = tiny_tokenizer.encode("I do n't know . Sure , fine 😀", add_special_tokens=False)
    tiny_tokenizer.clean_up_tokenization_spaces = True
    try:
        assert _RowText(tiny_tokenizer, _limits(tiny_tokenizer, 1)).decoder.stream is None
        pieces, rest, completion = _stream(tiny_tokenizer, ids)
        assert "".join(pieces) + rest == completion.text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        tiny_tokenizer.clean_up_tokenization_spaces = False

    class Rejecting(_CountingStream):
        def step(self, backend, ids):
            if _CountingStream.fed >= 5:
                raise Exception("Invalid prefix encountered")
            return super().step(backend, ids)

    _CountingStream.fed = 0
    monkeypatch.setattr(generation, "DecodeStream", Rejecting)
    with caplog.at_level(logging.WARNING, logger="minigpt4.chat.generation"):
        pieces, rest, completion = _stream(tiny_tokenizer, ids)
    assert "incremental decoding failed" in caplog.text
    assert "".join(pieces) + rest == completion.text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
