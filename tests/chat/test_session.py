"""`Chat`: greedy answers equal a plain loop over the same embeddings; conversation bookkeeping."""

from __future__ import annotations

import io

import pytest
import torch

from minigpt4.chat import Chat
from minigpt4.chat.templates import DEFAULT_SYSTEM
from minigpt4.processing.image import ImageError, eval_transform

QUESTION = "Describe this image in detail."


def handwritten_greedy(model, pixels, prompt: str, max_new_tokens: int, stop: str) -> list[int]:
    """The original's recipe with no cache: BOS + text segments tokenized one by one around the
    image embeddings, full recompute every step, argmax, stop when the text holds `stop`."""
    tokenizer, llm = model.tokenizer, model.llm
    embed = llm.get_input_embeddings()
    image = model.encode_images(pixels.unsqueeze(0))  # (1, Q, H)
    before, after = prompt.split("<ImageHere>")
    ids_before = [tokenizer.bos_token_id] + tokenizer(before, add_special_tokens=False).input_ids
    ids_after = tokenizer(after, add_special_tokens=False).input_ids
    sequence = torch.cat([embed(torch.tensor([ids_before])), image, embed(torch.tensor([ids_after]))], dim=1)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = llm(inputs_embeds=sequence, use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        if token == tokenizer.eos_token_id or stop in tokenizer.decode(new):
            break
        sequence = torch.cat([sequence, embed(torch.tensor([[token]]))], dim=1)
    return new


@torch.no_grad()
def test_greedy_chat_equals_a_handwritten_loop(tiny_model, pixels, photo):
    chat = Chat(tiny_model, eval_transform(tiny_model.config.vision.image_size))
    chat.upload(photo)
    chat.ask(QUESTION)
    prompt = chat.prompt()
    assert prompt == f"{DEFAULT_SYSTEM}###Human: <Img><ImageHere></Img> {QUESTION}###Assistant:"
    steps = []

    def record(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        steps.append((None if ids is None else ids.shape[1], cache is not None))

    hook = tiny_model.llm.register_forward_hook(record, with_kwargs=True)
    try:
        answer = chat.answer(do_sample=False, max_new_tokens=24)
    finally:
        hook.remove()
    # One prefill over the embeddings, then one token per step on the KV cache.
    assert steps[0][0] in (None, 0) and all(step == (1, True) for step in steps[1:])
    expected = handwritten_greedy(tiny_model, pixels, prompt, 24, "###")
    text = tiny_model.tokenizer.decode(expected, skip_special_tokens=True).split("###")[0].strip()
    assert answer == text
    assert chat.last_completion.completion_tokens == len(expected)
    assert len(expected) >= 5  # a real comparison, not an immediate stop

    # Second turn: the whole conversation is re-rendered, and streaming gives the same answer.
    chat.ask("What else?")
    second_prompt = chat.prompt()
    assert second_prompt == prompt + f" {answer}###Human: What else?###Assistant:"
    streamed = "".join(chat.stream(do_sample=False, max_new_tokens=16))
    expected = handwritten_greedy(tiny_model, pixels, second_prompt, 16, "###")
    assert streamed == tiny_model.tokenizer.decode(expected, skip_special_tokens=True).split("###")[0].strip()
    assert [m.role for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[-1].text == streamed


def test_upload_ask_reset_and_several_images(tiny_model, photo):
    chat = Chat(tiny_model, eval_transform(tiny_model.config.vision.image_size), system="")
    with pytest.raises(ValueError, match="nothing to answer"):
        chat.answer()
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    assert chat.upload(buffer.getvalue()) == "Received."
    chat.upload(photo.rotate(90))
    chat.ask("Compare them.")
    assert chat.prompt() == "###Human: <Img><ImageHere></Img> <Img><ImageHere></Img> Compare them.###Assistant:"
    chat.answer(do_sample=False, max_new_tokens=3)
    chat.upload(photo)  # a third image, in the next turn
    chat.ask("And this one?")
    assert chat.prompt().endswith("###Human: <Img><ImageHere></Img> And this one?###Assistant:")
    chat.answer(max_new_tokens=3, seed=0)
    assert len(chat._image_embeds) == 3
    with pytest.raises(ImageError, match="cannot read image"):
        chat.upload(b"this is not an image")
    with pytest.raises(ValueError, match="empty"):
        chat.ask("   ")
    chat.reset()
    assert chat.messages == [] and chat._image_embeds == []


def test_long_conversation_keeps_the_image(tiny_model, photo):
    chat = Chat(tiny_model, eval_transform(tiny_model.config.vision.image_size))
    chat.upload(photo)
    chat.ask(QUESTION)
    settings = dict(do_sample=False, max_new_tokens=10, max_context=240)
    chat.answer(**settings)
    for _ in range(6):
        chat.ask("Give me a detailed description of the picture, with every colour and shape in it.")
        chat.answer(**settings)
    assert len(chat.messages) == 14
    chat.ask("And now?")
    prompt, embeds = chat._fitted(chat.settings.replace(**settings))
    assert embeds.shape[0] == 1 and prompt.count("<ImageHere>") == 1
    assert prompt.startswith(DEFAULT_SYSTEM + "###Human: <Img><ImageHere></Img> " + QUESTION)
    assert prompt.count("###Human:") < 8


def test_closing_a_chat_stream_keeps_the_shown_part(tiny_model, photo):
    chat = Chat(tiny_model, eval_transform(tiny_model.config.vision.image_size))
    chat.upload(photo)
    chat.ask(QUESTION)
    pieces = chat.stream(do_sample=False, max_new_tokens=40, stop=[])
    shown = next(pieces)
    pieces.close()
    assert [m.role for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[-1].text == shown.strip()
    chat.ask("Next?")  # the conversation goes on normally
    assert chat.prompt().endswith("###Human: Next?###Assistant:")


def test_a_question_too_long_for_the_context_is_an_error_and_can_be_withdrawn(tiny_model, photo):
    chat = Chat(tiny_model, eval_transform(tiny_model.config.vision.image_size))
    chat.upload(photo)
    before = chat.prompt()
    chat.ask("describe the image " * 100)
    with pytest.raises(ValueError, match="the last message alone needs"):
        chat.answer(max_context=200, max_new_tokens=10)
    chat.withdraw_question()
    assert chat.prompt() == before  # the image stays, the question is gone
    chat.ask(QUESTION)
    assert chat.answer(do_sample=False, max_context=200, max_new_tokens=3) is not None
