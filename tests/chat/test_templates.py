"""Conversation templates render byte-exact prompts; truncation drops whole old turns only."""

from __future__ import annotations

import pytest

from minigpt4.chat.templates import (
    DEFAULT_SYSTEM,
    Message,
    fit_messages,
    get_template,
    prompt_length,
)
from minigpt4.model.llm import load_tokenizer
from minigpt4.processing.prompt import VICUNA_V0_TEMPLATE, conversation_turns, layout_conversation, layout_sample

# SmolLM2-135M-Instruct's chat template (ChatML), as its GGUF ships it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ONE_TURN = [Message("user", "What is in the picture?", images=1)]
TWO_TURNS = ONE_TURN + [Message("assistant", "A cat on a sofa."), Message("user", "What colour is it?")]


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    return load_tokenizer(tiny_llm_dir)


def test_vicuna_v0_matches_the_release_format(tokenizer):
    template = get_template("vicuna_v0", tokenizer)
    one = "###Human: <Img><ImageHere></Img> What is in the picture?###Assistant:"
    assert template.render(ONE_TURN, "SYS") == "SYS" + one
    assert template.render(TWO_TURNS, "SYS") == (
        "SYS###Human: <Img><ImageHere></Img> What is in the picture?###Assistant: A cat on a sofa."
        "###Human: What colour is it?###Assistant:"
    )
    assert template.render(ONE_TURN) == DEFAULT_SYSTEM + one
    # No system text is what the released weights were trained with.
    assert template.render(ONE_TURN, "").startswith("###Human: <Img><ImageHere></Img>")
    assert template.stop == ["###"]


def test_vicuna_v0_several_images_and_image_only_message(tokenizer):
    template = get_template("vicuna_v0", tokenizer)
    two = [Message("user", "Compare them.", images=2)]
    expected = "###Human: <Img><ImageHere></Img> <Img><ImageHere></Img> Compare them.###Assistant:"
    assert template.render(two, "") == expected
    assert template.render([Message("user", images=1)], "") == "###Human: <Img><ImageHere></Img>###Assistant:"


def test_vicuna_v0_train_matches_the_training_prompt(tokenizer):
    template = get_template("vicuna_v0_train", tokenizer)
    first = "###Human: <Img><ImageHere></Img> What is in the picture? ###Assistant: "
    assert template.render(ONE_TURN) == first
    assert first == VICUNA_V0_TEMPLATE.format("<Img><ImageHere></Img> What is in the picture?")  # training's own
    assert template.render(TWO_TURNS) == first + "A cat on a sofa.###Human: What colour is it? ###Assistant: "
    assert template.render(ONE_TURN, "SYS") == "SYS" + first
    assert template.stop == ["###"]


def test_llama2_matches_the_release_format(tokenizer):
    """CONV_VISION_LLama2: roles "<s>[INST] " and " [/INST] ", separator "", the system text in front."""
    template = get_template("llama2", tokenizer)
    one = "<s>[INST] <Img><ImageHere></Img> What is in the picture? [/INST] "
    assert template.render(ONE_TURN, "SYS") == "SYS" + one
    assert template.render(ONE_TURN) == DEFAULT_SYSTEM + one
    assert template.render(TWO_TURNS, "") == (
        "<s>[INST] <Img><ImageHere></Img> What is in the picture? [/INST] A cat on a sofa."
        "<s>[INST] What colour is it? [/INST] "
    )
    assert template.stop == ["</s>"]  # EOS: generation stops there


def test_llama2_token_ids_put_bos_on_the_first_piece_only(tokenizer):
    """The first piece gets the tokenizer's BOS; the `<s>` written in the text is the BOS token too; the piece
    after the image gets none."""
    prompt = get_template("llama2", tokenizer).render(ONE_TURN, "SYS")
    laid = layout_sample(tokenizer, prompt, 4)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    bos = tokenizer.bos_token_id
    before = ids("SYS") + [bos] + ids("[INST] <Img>")
    after = ids("</Img> What is in the picture? [/INST] ")
    assert laid.input_ids[: 1 + len(before)] == [bos] + before
    assert laid.image_mask == [False] * (1 + len(before)) + [True] * 4 + [False] * len(after)
    assert laid.input_ids[1 + len(before) + 4:] == after
    assert laid.input_ids.count(bos) == 2 and bos not in after


def test_tokenizer_chat_template(tiny_llm_dir):
    tokenizer = load_tokenizer(tiny_llm_dir)
    tokenizer.chat_template = CHATML
    template = get_template("chat_template", tokenizer)
    assert template.render(ONE_TURN, "SYS") == (
        "<|im_start|>system\nSYS<|im_end|>\n"
        "<|im_start|>user\n<Img><ImageHere></Img> What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(TWO_TURNS, "") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n<Img><ImageHere></Img> What is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA cat on a sofa.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.stop == ["</s>"]


def test_chat_template_bos_text_is_not_repeated(tiny_llm_dir):
    tokenizer = load_tokenizer(tiny_llm_dir)
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    prompt = get_template("chat_template", tokenizer).render(ONE_TURN, "")
    assert prompt == "<user><Img><ImageHere></Img> What is in the picture?"
    ids = layout_sample(tokenizer, prompt, 4).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_bad_templates_and_messages(tokenizer):
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'"):
        get_template("chatml", tokenizer)
    with pytest.raises(ValueError, match="has none"):
        get_template("chat_template", tokenizer)  # the tiny tokenizer has no chat template
    with pytest.raises(ValueError, match="placeholder"):
        Message("user", "look: <ImageHere>")
    with pytest.raises(ValueError, match="alternate"):
        get_template("vicuna_v0", tokenizer).render([Message("user", "a"), Message("user", "b")])


def _long_conversation(turns: int) -> list[Message]:
    messages = [
        Message("user", "Describe this image in detail.", images=1),
        Message("assistant", "a photo of a cat " * 6),
    ]
    for _ in range(turns):
        messages += [
            Message("user", "the dog runs in the park with a red ball"),
            Message("assistant", "a red circle " * 8),
        ]
    return messages + [Message("user", "Give me a detailed description of the picture.")]


def test_truncation_drops_whole_old_turns_and_keeps_system_bos_and_image(tokenizer):
    template = get_template("vicuna_v0", tokenizer)
    messages = _long_conversation(turns=6)
    q = 8  # image positions
    full = prompt_length(template, messages, None, tokenizer, q)
    budget = full - 60
    keep = fit_messages(template, messages, None, tokenizer, q, budget)
    # Turn 0 (the image) and the last question stay; old text turns go, whole and oldest first.
    assert keep[:2] == [0, 1] and keep[-1] == len(messages) - 1
    assert len(keep) % 2 == 1 and len(keep) < len(messages)
    dropped = sorted(set(range(len(messages))) - set(keep))
    assert dropped == list(range(2, 2 + len(dropped)))
    kept = [messages[i] for i in keep]
    prompt = template.render(kept)
    assert prompt.startswith(DEFAULT_SYSTEM + "###Human: <Img><ImageHere></Img> Describe")
    laid = layout_sample(tokenizer, prompt, q)
    assert len(laid.input_ids) <= budget
    assert laid.input_ids[0] == tokenizer.bos_token_id
    assert sum(laid.image_mask) == q  # the whole image, never a part of it
    # Nothing is dropped when everything fits.
    assert fit_messages(template, messages, None, tokenizer, q, full) == list(range(len(messages)))


def test_truncation_drops_image_turns_last_and_fails_clearly(tokenizer):
    template = get_template("vicuna_v0", tokenizer)
    messages = [
        Message("user", "the dog runs in the park", images=1),
        Message("assistant", "a red circle " * 10),
        Message("user", "a photo of a cat"),
        Message("assistant", "a blue square " * 10),
        Message("user", "Describe this image in detail."),
    ]
    only_last = prompt_length(template, messages[-1:], None, tokenizer, 8)
    assert fit_messages(template, messages, None, tokenizer, 8, only_last) == [4]
    with pytest.raises(ValueError, match="the last message alone needs"):
        fit_messages(template, messages, None, tokenizer, 8, only_last - 1)


def test_a_vicuna_v0_train_history_is_read_in_the_tokens_training_wrote(tokenizer):
    # Training tokenizes each prompt and each answer + "###" on its own (`conversation_turns`); a history rendered
    # as one string would merge the prompt's trailing space into the answer's first word ("Ġcat" for "Ġ" + "cat").
    exchanges = [("What is in the picture?", "cat on a sofa."), ("What colour is it?", "grey"), ("Where?", None)]
    trained = layout_conversation(
        tokenizer, conversation_turns(VICUNA_V0_TEMPLATE, exchanges, "###", "<Img><ImageHere></Img>"), 4, "###")
    history = [Message("user", "What is in the picture?", images=1), Message("assistant", "cat on a sofa."),
               Message("user", "What colour is it?"), Message("assistant", "grey"), Message("user", "Where?")]
    prompt = get_template("vicuna_v0_train", tokenizer).render(history, None)
    assert layout_sample(tokenizer, prompt, 4).input_ids == trained.input_ids
    # The same text as before, and what the whole string would have given differs.
    assert prompt == "".join(VICUNA_V0_TEMPLATE.format(q) + (a or "") for q, a in
                             [("<Img><ImageHere></Img> " + exchanges[0][0], exchanges[0][1]), *exchanges[1:]])
    assert layout_sample(tokenizer, str(prompt), 4).input_ids != trained.input_ids
