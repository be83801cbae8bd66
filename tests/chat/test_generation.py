"""Batched generation: stop strings end every row, left padding is exact, settings behave."""

from __future__ import annotations

import threading

import pytest
import torch

from minigpt4.chat.generation import GenerationSettings, generate, stream, stream_batch
from minigpt4.chat.templates import Message, get_template
from minigpt4.processing.prompt import layout_sample
from minigpt4.testing import make_bigram

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=8)
# Four prompts whose last tokens start chains that reach "###" after 1, 2, 4 and 3 tokens, each
# tokenized differently: "▁###", "###", "##"+"#", "<0x23>"+"##".
PROMPTS = [
    "<Img><ImageHere></Img> describe the",
    "<Img><ImageHere></Img> describe this",
    "<Img><ImageHere></Img> describe the image and",
    "<Img><ImageHere></Img> describe you",
]
CHAINS = [
    ["▁the", "▁###"],
    ["▁this", "▁red", "###"],
    ["▁and", "▁image", "▁of", "##", "#"],
    ["▁you", "▁me", "<0x23>", "##"],
]


@pytest.fixture
def bigram_model(tiny_model):
    vocab = tiny_model.tokenizer.get_vocab()
    successor = {}
    for chain in CHAINS:
        for source, target in zip(chain, chain[1:], strict=False):
            successor[vocab[source]] = vocab[target]
    successor[vocab["##"]] = vocab["#"]
    # After a stop string the text would go on with "in in in ..." if nothing stopped it.
    for end in ("▁###", "###", "#", "▁in"):
        successor[vocab[end]] = vocab["▁in"]
    make_bigram(tiny_model.llm, successor)
    for prompt, chain in zip(PROMPTS, CHAINS, strict=True):
        assert layout_sample(tiny_model.tokenizer, prompt, 8).input_ids[-1] == vocab[chain[0]]
    return tiny_model


def test_batched_generation_stops_every_row_at_stop_string(bigram_model, pixels):
    calls = []
    hook = bigram_model.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = generate(bigram_model, PROMPTS, [[pixels]] * 4, GREEDY, template_stops=["###"])
    finally:
        hook.remove()
    assert [c.text for c in out] == ["", "red", "image of", "me"]
    assert [c.completion_tokens for c in out] == [1, 2, 4, 3]
    assert [c.finish_reason for c in out] == ["stop"] * 4
    # The loop ended as soon as the slowest row stopped: one forward pass per generated step.
    assert len(calls) == 4
    # Without the stop string every row would have run on to max_new_tokens.
    free = generate(bigram_model, PROMPTS, [[pixels]] * 4, GREEDY)
    assert all(c.finish_reason == "length" and c.completion_tokens == 8 and "###" in c.text for c in free)


def test_stop_strings_from_settings_and_inside_one_token(bigram_model, pixels):
    out = generate(bigram_model, PROMPTS[2:3], [[pixels]], GREEDY.replace(stop=["ag"]))
    assert out[0].text == "im" and out[0].completion_tokens == 1 and out[0].finish_reason == "stop"


def test_stream_yields_the_same_text_and_never_the_stop_string(bigram_model, pixels):
    for prompt in PROMPTS:
        pieces = list(stream(bigram_model, prompt, [pixels], GREEDY, template_stops=["###"]))
        expected = generate(bigram_model, [prompt], [[pixels]], GREEDY, template_stops=["###"])[0].text
        assert "".join(pieces) == expected
        assert all("#" not in piece for piece in pieces)


def test_stream_batch_hands_every_row_its_text_from_one_generate(bigram_model, pixels):
    pieces: list[list[str]] = [[] for _ in PROMPTS]
    calls = []
    hook = bigram_model.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = stream_batch(bigram_model, PROMPTS, [[pixels]] * 4, GREEDY, lambda row, text: pieces[row].append(text),
                           template_stops=["###"])
    finally:
        hook.remove()
    assert len(calls) == 4  # one batched generation, ended when the slowest row stopped
    assert out == generate(bigram_model, PROMPTS, [[pixels]] * 4, GREEDY, template_stops=["###"])
    assert ["".join(row) for row in pieces] == ["", "red", "image of", "me"]
    assert len(pieces[2]) == 2  # "image", then " of": handed out step by step, not at the end
    assert all("#" not in piece for row in pieces for piece in row)


def test_stream_batch_cancelled_row_ends_alone(bigram_model, pixels):
    settings = GREEDY.replace(max_new_tokens=30)
    cancelled = [threading.Event(), threading.Event()]
    pieces: list[list[str]] = [[], []]

    def on_delta(row: int, text: str) -> None:
        pieces[row].append(text)
        if row == 0:
            cancelled[0].set()  # row 0's client leaves after its first piece

    out = stream_batch(bigram_model, PROMPTS[:2], [[pixels]] * 2, settings, on_delta, cancelled=cancelled)
    assert out[0] is None and pieces[0] == ["###"]  # "### in in ...": nothing after the cancel
    alone = generate(bigram_model, PROMPTS[1:2], [[pixels]], settings)[0]
    assert out[1] == alone and alone.completion_tokens == 30 and "".join(pieces[1]) == alone.text


def test_repetition_penalty_sees_generated_tokens(bigram_model, pixels):
    looping = generate(bigram_model, PROMPTS[:1], [[pixels]], GREEDY)[0]
    assert looping.text.split().count("in") >= 5  # "### in in in ..."
    penalised = generate(bigram_model, PROMPTS[:1], [[pixels]], GREEDY.replace(repetition_penalty=1e6))[0]
    ids = bigram_model.tokenizer(penalised.text, add_special_tokens=False).input_ids
    assert "in in" not in penalised.text and len(ids) >= 3


def test_left_padded_batch_equals_rows_alone(tiny_model, pixels):
    template = get_template("vicuna_v0", tiny_model.tokenizer)
    questions = ["Describe this image in detail.", "What?", "Could you describe the contents of this image for me?"]
    prompts = [template.render([Message("user", q, images=1)]) for q in questions]
    settings = GenerationSettings(do_sample=False, max_new_tokens=6, stop=["###"])
    batched = generate(tiny_model, prompts, [[pixels]] * 3, settings)
    alone = [generate(tiny_model, [p], [[pixels]], settings)[0] for p in prompts]
    assert batched == alone
    assert len({c.prompt_tokens for c in batched}) == 3


def test_sampling_is_seedable_and_beam_search_runs(tiny_model, pixels):
    prompt = ["<Img><ImageHere></Img> describe the image"]
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.5, top_k=40, top_p=0.95, seed=7)
    first = generate(tiny_model, prompt, [[pixels]], sampled)
    assert generate(tiny_model, prompt, [[pixels]], sampled) == first
    others = [generate(tiny_model, prompt, [[pixels]], sampled.replace(seed=s))[0].text for s in range(4)]
    assert len(set(others + [first[0].text])) > 1
    rng_before = torch.get_rng_state()
    generate(tiny_model, prompt, [[pixels]], sampled)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeding does not touch the caller's RNG
    beams = GenerationSettings(do_sample=False, num_beams=3, max_new_tokens=5)
    assert generate(tiny_model, prompt, [[pixels]], beams) == generate(tiny_model, prompt, [[pixels]], beams)
    expected = generate(tiny_model, prompt, [[pixels]], beams)[0].text
    assert "".join(stream(tiny_model, prompt[0], [pixels], beams)) == expected


def test_context_budget_and_input_errors(tiny_model, pixels):
    prompt = "<Img><ImageHere></Img> describe the image"
    length = len(layout_sample(tiny_model.tokenizer, prompt, tiny_model.num_image_tokens).input_ids)
    out = generate(tiny_model, [prompt], [[pixels]], GREEDY.replace(max_new_tokens=50, max_context=length + 3))[0]
    assert out.completion_tokens <= 3 and out.prompt_tokens == length
    with pytest.raises(ValueError, match="no room under max_context"):
        generate(tiny_model, [prompt], [[pixels]], GREEDY.replace(max_context=length))
    with pytest.raises(ValueError, match="1 <ImageHere> placeholder\\(s\\) but 2 image"):
        generate(tiny_model, [prompt], [[pixels, pixels]], GREEDY)
    with pytest.raises(ValueError, match="GenerationSettings.top_p=1.5"):
        GenerationSettings(top_p=1.5)
    with pytest.raises(TypeError, match="unknown generation setting"):
        GREEDY.replace(beams=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        stream_batch(tiny_model, [], [], GREEDY, lambda row, text: None)


def test_closing_a_stream_stops_generation(bigram_model, pixels):
    calls = []
    hook = bigram_model.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        pieces = stream(bigram_model, PROMPTS[0], [pixels], GREEDY.replace(max_new_tokens=500))  # "### in in in ..."
        first = next(pieces)
        pieces.close()  # a client went away
    finally:
        hook.remove()
    assert first == "###"
    assert len(calls) < 50  # the generation thread stopped soon after, not at 500 tokens


def test_new_tokens_are_found_whatever_generate_puts_in_front(tiny_model, pixels):
    """transformers 5 returns only new ids for `inputs_embeds`; older versions (and callers passing
    `input_ids` too) put the prompt in front. The stopping criterion's probe handles both."""
    from transformers import StoppingCriteriaList

    from minigpt4.chat.generation import RowLimits, StopCriteria, _generation_config, prepare_inputs
    from minigpt4.processing.prompt import collate_layouts, pad_token_id

    prompt = "<Img><ImageHere></Img> describe the image"
    reference = generate(tiny_model, [prompt], [[pixels]], GREEDY)[0]
    with torch.inference_mode():
        embeds = tiny_model.encode_images(pixels.unsqueeze(0))
        prepared = prepare_inputs(tiny_model, [prompt], [embeds])
        laid = layout_sample(tiny_model.tokenizer, prompt, tiny_model.num_image_tokens)
        ids = collate_layouts([laid], pad_token_id(tiny_model.tokenizer), "left").input_ids
        for input_ids, prefix in ((None, 0), (ids, ids.shape[1])):
            eos = tiny_model.tokenizer.eos_token_id
            criteria = StopCriteria(tiny_model.tokenizer, [RowLimits((), (eos,), GREEDY.max_new_tokens)])
            config = _generation_config(tiny_model, GREEDY, GREEDY.max_new_tokens, [eos])
            sequences = tiny_model.llm.generate(
                input_ids, inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                generation_config=config, stopping_criteria=StoppingCriteriaList([criteria]),
            )
            assert criteria.prefix_length == prefix
            new = sequences[0, criteria.prefix_length:].tolist()
            assert tiny_model.tokenizer.decode(new, skip_special_tokens=True).strip() == reference.text


@pytest.mark.parametrize(
    "name, value",
    [("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")),
     ("repetition_penalty", float("inf")), ("max_time", float("nan")), ("max_time", 0.0), ("max_time", float("inf"))],
)
def test_settings_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"GenerationSettings.{name}="):
        GenerationSettings(**{name: value})


def test_tiny_temperature_decodes_greedily(tiny_model, pixels):
    """1e-45 turns every logit / T into inf in float32 (sampling used to fail on NaN probabilities)."""
    prompt = "<Img><ImageHere></Img> describe the image"
    greedy = generate(tiny_model, [prompt], [[pixels]], GREEDY)[0]
    for temperature in (1e-45, 5e-324):
        tiny = GenerationSettings(temperature=temperature, max_new_tokens=GREEDY.max_new_tokens)
        assert generate(tiny_model, [prompt], [[pixels]], tiny)[0] == greedy
        assert "".join(stream(tiny_model, prompt, [pixels], tiny)) == greedy.text


def test_rows_with_their_own_length_and_stops_share_one_generate(bigram_model, pixels):
    """Per-row max_new_tokens and stop strings in one call: each row ends exactly as it would alone."""
    rows = [GREEDY.replace(max_new_tokens=5), GREEDY.replace(stop=["###"]), GREEDY.replace(max_new_tokens=2),
            GREEDY.replace(stop=["me"], max_new_tokens=6)]
    alone = [generate(bigram_model, [p], [[pixels]], s)[0] for p, s in zip(PROMPTS, rows, strict=True)]
    assert [c.completion_tokens for c in alone] == [5, 2, 2, 1]
    assert [c.finish_reason for c in alone] == ["length", "stop", "length", "stop"]
    calls = []
    hook = bigram_model.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        batched = generate(bigram_model, PROMPTS, [[pixels]] * 4, rows)
    finally:
        hook.remove()
    assert batched == alone
    assert len(calls) == 5  # one generate, ended with its longest row
    pieces: list[list[str]] = [[] for _ in PROMPTS]
    streamed = stream_batch(bigram_model, PROMPTS, [[pixels]] * 4, rows, lambda row, text: pieces[row].append(text))
    assert streamed == alone and ["".join(p) for p in pieces] == [c.text for c in alone]
    with pytest.raises(ValueError, match="may differ only in max_new_tokens and stop"):
        generate(bigram_model, PROMPTS[:2], [[pixels]] * 2, [GREEDY, GREEDY.replace(top_k=3)])


def test_generate_cancelled_rows_end_at_the_next_step(bigram_model, pixels):
    """A plain (unstreamed) call stops a row whose client left; once all have, generation ends."""
    settings = GREEDY.replace(max_new_tokens=40)  # "### in in in ...": nothing stops it before 40
    cancelled = [threading.Event(), threading.Event()]
    calls = []

    def count(*args) -> None:
        calls.append(1)
        if len(calls) == 3:
            cancelled[0].set()
        if len(calls) == 6:
            cancelled[1].set()

    hook = bigram_model.llm.register_forward_hook(count)
    try:
        out = generate(bigram_model, PROMPTS[:2], [[pixels]] * 2, settings, cancelled=cancelled)
    finally:
        hook.remove()
    assert out == [None, None]
    assert len(calls) <= 7  # not 40
    cancelled = [threading.Event(), threading.Event()]
    hook = bigram_model.llm.register_forward_hook(lambda *args: cancelled[0].set())
    try:
        out = generate(bigram_model, PROMPTS[:2], [[pixels]] * 2, settings, cancelled=cancelled)
    finally:
        hook.remove()
    assert out[0] is None and out[1] == generate(bigram_model, PROMPTS[1:2], [[pixels]], settings)[0]
