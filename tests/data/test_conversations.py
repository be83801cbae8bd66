"""Instruction conversations: LLaVA's file layout read for training, laid out turn by turn with only the answers
learned, as the chat template renders the same messages; a stage-2 run trains on them (with and without a cache)."""

from __future__ import annotations

import json

import pytest
import torch

from minigpt4.chat.templates import VICUNA_IMAGE, Message, get_template
from minigpt4.data.conversations import conversation_batches, exchanges
from minigpt4.data.synthetic import draw_scene, write_conversations
from minigpt4.processing.image import eval_transform
from minigpt4.processing.prompt import (
    IGNORE_INDEX,
    VICUNA_V0_TEMPLATE,
    conversation_turns,
    layout_conversation,
    layout_sample,
)

EXCHANGES = [("What colour is the shape?", "red"), ("How many shapes are there?", "2"),
             ("Is there a blue star in the image?", "No, there is no blue star.")]


def _file(tmp_path, count=6):
    items = [(f"c{i}", draw_scene(i, size=32)[0], EXCHANGES[: 1 + i % 3]) for i in range(count)]
    return write_conversations(tmp_path / "conv" / "conversations.json", items)


def test_multi_turn_layout_learns_only_the_answers_and_renders_as_chat(tiny_model):
    tokenizer = tiny_model.tokenizer
    turns = conversation_turns(VICUNA_V0_TEMPLATE, EXCHANGES, "###", VICUNA_IMAGE)
    laid = layout_conversation(tokenizer, turns, tiny_model.num_image_tokens, end_sym="###")
    # The labelled tokens are exactly the answers, each + "###", in order; no prompt token is learned.
    learned = [t for t in laid.labels if t != IGNORE_INDEX]
    expected = [t for _, answer in EXCHANGES for t in tokenizer(answer + "###", add_special_tokens=False)["input_ids"]]
    assert learned == expected
    runs, inside = [], False
    for label in laid.labels:  # three separate labelled runs: one per answer
        if (label != IGNORE_INDEX) != inside:
            inside = not inside
            runs += [inside]
    assert runs.count(True) == 3
    assert sum(laid.image_mask) == tiny_model.num_image_tokens and not any(
        m and lab != IGNORE_INDEX for m, lab in zip(laid.image_mask, laid.labels))
    # The text is what the chat template (vicuna_v0_train) renders for the same messages, answers included.
    messages = [Message("user", EXCHANGES[0][0], images=1)]
    for number, (question, answer) in enumerate(EXCHANGES):
        if number:
            messages.append(Message("user", question))
        messages.append(Message("assistant", answer))
    rendered = get_template("vicuna_v0_train", tokenizer).render(messages + [Message("user", "next?")])
    text = "".join(prompt + answer + "###" for prompt, answer in turns)
    assert rendered.startswith(text) and rendered[len(text):] == "Human: next? ###Assistant: "
    # One turn is layout_sample: the single-turn stage-2 layout is unchanged.
    one = layout_sample(tokenizer, turns[0][0], tiny_model.num_image_tokens, target="red", end_sym="###")
    assert one == layout_conversation(tokenizer, turns[:1], tiny_model.num_image_tokens, end_sym="###")
    with pytest.raises(ValueError, match="only the last turn may be unanswered"):
        layout_conversation(tokenizer, [(turns[0][0], None), turns[1]], tiny_model.num_image_tokens)


def test_reader_batches_and_skips_and_data_check_lists_them(tmp_path, capsys):
    path = _file(tmp_path)
    records = json.loads(path.read_text())
    records[1]["conversations"] = records[1]["conversations"][:1]  # a question without its answer
    records[2]["image"] = "image/missing.jpg"
    records[3]["conversations"][0]["from"] = "gpt"
    path.write_text(json.dumps(records))
    batches = conversation_batches(str(path), eval_transform(32), 3, seed=0)
    batch = next(batches)
    assert batch["image"].shape == (3, 3, 32, 32)
    assert sorted(batch["key"]) == ["c0", "c4", "c5"]
    assert sorted(s.reason.split(":")[0] for s in batch["skipped"]) == ["bad roles", "missing image",
                                                                        "odd conversation"]
    texts = {key: json.loads(text) for key, text in zip(batch["key"], batch["text"])}
    # The <image> tag is taken out of the first question; every exchange is kept, in order.
    assert texts["c5"] == [list(pair) for pair in EXCHANGES]
    assert exchanges({"conversations": [{"from": "human", "value": "<image>\nHi?"},
                                        {"from": "gpt", "value": " Yes. "}]}) == [["Hi?", "Yes."]]

    # `minigpt4 data check` reads the file as training does and lists the same three.
    from minigpt4.cli import main

    assert main(["data", "check", str(path)]) == 1
    printed = capsys.readouterr().out
    assert f"BROKEN {path} (conversations): 3 good samples, 3 broken; 6 conversation(s)" in printed
    assert f"{path} [c1]: odd conversation" in printed


def test_a_stage2_run_trains_on_conversations_with_and_without_a_cache(tmp_path, tiny_llm_dir):
    import yaml

    from minigpt4.config import ConfigError, train_config
    from minigpt4.feature_cache import build_cache, data_transform
    from minigpt4.model.build import build_job_model
    from minigpt4.train.loop import train

    path = _file(tmp_path, 8)
    job = {"preset": "tiny", "model": {"llm": {"path": str(tiny_llm_dir)}, "vision": {"image_size": 28}},
           "data": {"datasets": [{"kind": "conversations", "path": str(path)}], "batch_size": 4, "num_workers": 0,
                    "augment": False, "prompt_template": VICUNA_V0_TEMPLATE, "end_sym": "###"},
           "train": {"iters_per_epoch": 2, "epochs": 1, "precision": "fp32", "tensorboard": False,
                     "warmup_steps": 0}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    def config(*extra: str):
        return train_config(tmp_path / "job.yaml", list(extra))

    cfg = config(f"train.output_dir={tmp_path / 'run'}")
    result = train(cfg)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["chat"]["template"] == "vicuna_v0_train"  # chats in the layout it trained

    cached = config(f"train.output_dir={tmp_path / 'cached'}", f"data.feature_cache={tmp_path / 'cache'}")
    count, skipped = build_cache(build_job_model(cached), [("conversations", str(path))], tmp_path / "cache",
                                 data_transform(cached))
    assert count == 8 and not skipped
    assert train(cached).steps == 2

    with pytest.raises(ConfigError, match="data.prompts='default' with a kind=conversations dataset"):
        train(config("data.prompts=default", f"train.output_dir={tmp_path / 'bad'}"))
