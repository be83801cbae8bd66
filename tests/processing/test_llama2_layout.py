"""The Llama-2 release's training layout through the one layout function: prompt, token ids, targets."""

from __future__ import annotations

import pytest

from minigpt4.data.prompts import load_prompts
from minigpt4.model.llm import load_tokenizer
from minigpt4.processing.prompt import IGNORE_INDEX, LLAMA2_TEMPLATE, layout_batch

IMAGE_TOKENS = 64  # 256 ViT patches merged 4 at a time


@pytest.fixture(scope="module")
def tok(tiny_llama2_llm_dir):
    return load_tokenizer(tiny_llama2_llm_dir, "$$")


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_prompt_string():
    prompt = LLAMA2_TEMPLATE.format("<Img><ImageHere></Img> Describe this image in detail.")
    assert prompt == "[INST] <Img><ImageHere></Img> Describe this image in detail. [/INST] "
    assert all(p.startswith("[INST] <Img><ImageHere></Img> ") and p.endswith(". [/INST] ")
               for p in load_prompts(None, LLAMA2_TEMPLATE))


def test_token_ids_and_targets(tok):
    prompt = LLAMA2_TEMPLATE.format("<Img><ImageHere></Img> Describe this image in detail.")
    batch = layout_batch(tok, ["a cat", "the dog runs in the park"], IMAGE_TOKENS, prompt, "</s>", 160)
    before, after = ids(tok, "[INST] <Img>"), ids(tok, "</Img> Describe this image in detail. [/INST] ")
    pad, eos = tok.convert_tokens_to_ids("$$"), tok.eos_token_id
    assert pad != eos and ids(tok, "a cat</s>")[-1] == eos  # "</s>" is tokenized to the EOS id
    prefix = 1 + len(before) + IMAGE_TOKENS + len(after)
    for row, text in enumerate(["a cat", "the dog runs in the park"]):
        answer = ids(tok, text) + [eos]
        end = prefix + len(answer)
        got = batch.input_ids[row].tolist()
        assert got[0] == tok.bos_token_id and got[1:1 + len(before)] == before
        assert batch.image_mask[row, 1 + len(before):1 + len(before) + IMAGE_TOKENS].all()
        assert batch.image_mask[row].sum() == IMAGE_TOKENS
        assert got[prefix - len(after):prefix] == after
        assert got[prefix:end] == answer  # the answer right after this row's prompt, EOS included
        assert got[end:] == [pad] * (len(got) - end)  # then right padding with the pad id
        assert batch.attention_mask[row].tolist() == [1] * end + [0] * (len(got) - end)
        assert batch.labels[row].tolist() == [IGNORE_INDEX] * prefix + answer + [IGNORE_INDEX] * (len(got) - end)
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()


def test_pad_tokens_in_an_answer_are_not_learned_and_eos_is(tok):
    batch = layout_batch(tok, ["a $$ cat"], IMAGE_TOKENS, None, "</s>", 160)
    learned = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    pad = tok.pad_token_id
    assert pad in batch.input_ids[0].tolist() and pad not in learned
    assert learned[-1] == tok.eos_token_id


def test_truncation_can_cut_the_end_symbol(tok):
    batch = layout_batch(tok, ["the dog runs in the park"], IMAGE_TOKENS, None, "</s>", 3)
    learned = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert learned == ids(tok, "the dog runs in the park")[:3] and tok.eos_token_id not in learned
