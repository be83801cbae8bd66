"""A saved model carries how to talk to it: chat, caption, demo and serve use its template and decoding.

The tiny model is made an exact bigram model that answers differently depending on the template:
a `vicuna_v0` prompt ends with ":" and gets "a red image###"; a `vicuna_v0_train` prompt ends with
"▁" (its trailing space) and gets "in###". So the answer shows which template was used.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig

from minigpt4 import MiniGPT4
from minigpt4.chat import GenerationSettings
from minigpt4.chat.defaults import ChatDefaults
from minigpt4.cli import main
from minigpt4.serve.api import ChatService
from minigpt4.serve.config import ServeConfig
from minigpt4.serve.engine import ModelEngine
from minigpt4.serve.schemas import ChatCompletionRequest
from minigpt4.testing import make_bigram
from tests.serve.conftest import data_url, free_port, image_message, running_server

RELEASE_CHAIN = [":", "▁a", "▁red", "▁image", "###"]  # what a vicuna_v0 prompt ("...###Assistant:") gets
TRAIN_CHAIN = ["▁", "▁in", "###"]  # what a vicuna_v0_train prompt ("... ###Assistant: ") gets
RELEASE_ANSWER, TRAIN_ANSWER = "a red image", "in"


@pytest.fixture(scope="module")
def saved(tiny_llm_dir, tmp_path_factory):
    """A bigram model saved (LLM included) with template vicuna_v0_train, no system text, greedy, 8 tokens."""
    from minigpt4.config import model_preset
    from minigpt4.model.build import build_model

    cfg = model_preset("tiny")
    cfg.llm.path = str(tiny_llm_dir)
    torch.manual_seed(0)
    model = build_model(cfg)
    vocab = model.tokenizer.get_vocab()
    successor = {}
    for chain in (RELEASE_CHAIN, TRAIN_CHAIN):
        successor.update({vocab[a]: vocab[b] for a, b in zip(chain, chain[1:], strict=False)})
    successor[vocab["###"]] = vocab["▁red"]
    make_bigram(model.llm, successor)
    model.chat_defaults = ChatDefaults("vicuna_v0_train", "", GenerationSettings(do_sample=False, max_new_tokens=8))
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder, include_llm=True)
    return folder


@pytest.fixture(scope="module")
def loaded(saved):
    return MiniGPT4.from_pretrained(saved)


@pytest.fixture
def cat_file(photo, tmp_path):
    path = tmp_path / "cat.png"
    photo.save(path)
    return path


def test_the_folder_records_template_and_decoding_as_transformers_does(saved, loaded):
    assert json.loads((saved / "config.json").read_text())["chat"] == {"template": "vicuna_v0_train", "system": ""}
    generation = GenerationConfig.from_pretrained(saved)  # transformers reads it as the model's generation config
    assert generation.do_sample is False and generation.max_new_tokens == 8 and generation.num_beams == 1
    talk = loaded.chat_defaults
    assert (talk.template, talk.system, talk.generation.do_sample, talk.generation.max_new_tokens) == \
        ("vicuna_v0_train", "", False, 8)
    assert talk.describe() == (f"template vicuna_v0_train (from {saved / 'config.json'}), greedy, up to 8 new tokens "
                               f"(from {saved / 'generation_config.json'})")


def test_release_defaults_are_the_original_demo_with_its_implicit_top_k(tmp_path):
    talk = ChatDefaults()
    assert talk.template == "vicuna_v0" and talk.system is None
    assert talk.decoding() == {"max_new_tokens": 300, "do_sample": True, "temperature": 1.0, "top_p": 0.9,
                               "top_k": 50, "num_beams": 1, "repetition_penalty": 1.0}
    talk.save_generation_config(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).top_k == 50


def test_chat_cli_uses_the_saved_template_and_decoding(saved, cat_file, capsys):
    rc = main(["chat", "--checkpoint", str(saved), "--image", str(cat_file), "--no-stream", "What is this?"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.rstrip("\n").splitlines()[-1] == TRAIN_ANSWER
    assert (f"template vicuna_v0_train (from {saved / 'config.json'}), greedy, up to 8 new tokens "
            f"(from {saved / 'generation_config.json'})") in captured.err


def test_chat_cli_flags_override_the_saved_defaults(saved, cat_file, capsys):
    rc = main(["chat", "--checkpoint", str(saved), "--image", str(cat_file), "--no-stream", "--template", "vicuna_v0",
               "--sample", "--temperature", "0.5", "--seed", "1", "What is this?"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.rstrip("\n").splitlines()[-1] == RELEASE_ANSWER
    assert "template vicuna_v0 (from --template)" in captured.err
    assert (f"sampling (temperature 0.5, top-p 0.9, top-k 50), up to 8 new tokens "
            f"(from {saved / 'generation_config.json'}; --sample, --temperature)") in captured.err


def test_caption_cli_uses_the_saved_template(saved, cat_file, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--checkpoint", str(saved), str(cat_file), "-o", str(out)]) == 0
    assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == [TRAIN_ANSWER]
    assert "template vicuna_v0_train" in capsys.readouterr().err


def test_caption_decodes_greedily_a_model_that_records_no_decoding(tiny_llm_dir, cat_file, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--preset", "tiny", str(cat_file), f"llm.path={tiny_llm_dir}", "-o", str(out),
                 "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert ("template vicuna_v0 (from the original release's defaults), greedy, up to 3 new tokens (from the original "
            "release's defaults; --max-new-tokens; greedy: this command's default when the model records no decoding)"
            ) in err


def test_chat_session_and_engine_default_to_the_model_and_take_overrides(loaded):
    from minigpt4.chat import Chat
    from minigpt4.processing.image import eval_transform

    chat = Chat(loaded, eval_transform(loaded.config.vision.image_size))
    assert (chat.template.name, chat.system, chat.settings.do_sample) == ("vicuna_v0_train", "", False)
    assert Chat(loaded, eval_transform(), template="vicuna_v0").system is None  # the template's own system text
    engine = ModelEngine(loaded)
    assert (engine.template.name, engine.system, engine.generation.do_sample) == ("vicuna_v0_train", "", False)
    assert ModelEngine(loaded, template="vicuna_v0").template.name == "vicuna_v0"


def test_serve_requests_default_to_the_saved_decoding(loaded, photo):
    service = ChatService(ModelEngine(loaded), ServeConfig())
    message = image_message(data_url(photo), "What is this?")

    def settings(**fields) -> GenerationSettings:
        request = ChatCompletionRequest(model="minigpt4", messages=[message], **fields)
        return service.prepare(request, {}).settings  # data: URLs only, so nothing fetched

    assert settings().do_sample is False
    sampled = settings(temperature=0.7, top_p=0.5)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (True, 0.7, 0.5, 50)
    assert settings(temperature=0).do_sample is False


def test_serve_answers_with_the_saved_template(loaded, photo):
    import httpx

    with running_server(ModelEngine(loaded), ServeConfig()) as base:
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "minigpt4", "messages": [image_message(data_url(photo), "What is this?")]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == TRAIN_ANSWER


# ------------------------------------------------------------------------------ the demo, in a browser


@pytest.fixture
def demo_url(loaded, tmp_path):
    from minigpt4.serve.gradio_app import build_demo, launch
    demo = build_demo(loaded, examples_dir=tmp_path / "examples")  # nothing given: the model's defaults
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_demo_uses_the_saved_template_and_decoding(demo_url, saved, cat_file, browser):
    from tests.serve.test_demo_browser import _status_contains, _upload

    page = browser.new_page()
    page.goto(demo_url)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)
    info = page.locator("#model-info").inner_text()
    assert f"template vicuna_v0_train (from {saved / 'config.json'}), greedy, up to 8 new tokens" in info
    assert not page.get_by_label("Sample (off: greedy / plain beam search)").is_checked()
    _upload(page, cat_file)
    _status_contains(page, "Image received")
    page.locator("#question textarea").fill("What is this?")
    page.locator("#question textarea").press("Enter")
    page.wait_for_function(
        "t => [...document.querySelectorAll(\"#chatbot [data-testid='bot']\")]"
        ".some(e => e.innerText.trim() === t)", arg=TRAIN_ANSWER, timeout=60_000)


# ------------------------------------------------------------------------------ training checkpoints


def _job(tiny_config, **data):
    from minigpt4.config import TrainJobConfig

    cfg = TrainJobConfig()
    cfg.model = tiny_config
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_training_records_its_stage_layout_as_the_template(tiny_model, tiny_config, caplog):
    from minigpt4.processing.prompt import VICUNA_V0_TEMPLATE
    from minigpt4.train.checkpoint import chat_record

    stage1 = chat_record(_job(tiny_config, prompts=""), tiny_model)
    assert (stage1["template"], stage1["system"]) == ("caption", "")
    stage2 = chat_record(_job(tiny_config, prompts="default", prompt_template=VICUNA_V0_TEMPLATE, end_sym="###"),
                         tiny_model)
    assert (stage2["template"], stage2["system"]) == ("vicuna_v0_train", "")
    assert stage2["generation"] == ChatDefaults().decoding()  # the model's own (here the release's) decoding
    other = chat_record(_job(tiny_config, prompts="default", prompt_template="[INST] {} [/INST]", end_sym="</s>"),
                        tiny_model)
    assert other["template"] == "vicuna_v0" and "matches no conversation template" in caplog.text


def test_caption_template_is_the_stage1_layout(tiny_model):
    from minigpt4.chat.templates import Message, get_template

    template = get_template("caption", tiny_model.tokenizer)
    assert template.render([Message("user", "ignored", images=1)]) == "<ImageHere>"
    assert template.render([Message("user", "", images=1), Message("assistant", "a red circle"),
                            Message("user", "", images=1)]) == "<ImageHere>a red circle\n<ImageHere>"
    assert template.stop == ["\n"]


def test_a_training_checkpoint_carries_its_chat_defaults_into_the_exported_folder(tiny_model, tiny_config, tmp_path):
    from minigpt4.commands.quickstart import export
    from minigpt4.config import to_dict
    from minigpt4.convert import load_projection
    from minigpt4.model.build import build_model
    from minigpt4.processing.prompt import VICUNA_V0_TEMPLATE
    from minigpt4.train import checkpoint as ckpt
    from minigpt4.train.optim import build_optimizer

    job = _job(tiny_config, prompts="default", prompt_template=VICUNA_V0_TEMPLATE, end_sym="###")
    state = {
        "format": ckpt.FORMAT, "model": ckpt.trainable_state_dict(tiny_model),
        "optimizer": build_optimizer(tiny_model, job.train).state_dict(), "scaler": None, "step": 1, "epoch": 0,
        "data": {"batches": 1}, "rng": [], "skipped": 0, "config": to_dict(job), "chat": ckpt.chat_record(job, tiny_model),
    }
    path = ckpt.save_atomic(state, ckpt.checkpoint_path(tmp_path, 1))
    model = build_model(tiny_config)
    load_projection(model, path)  # model.weights.projection=<training checkpoint>
    assert (model.chat_defaults.template, model.chat_defaults.template_source) == ("vicuna_v0_train", str(path))
    folder = export(job, path, tmp_path / "model")  # the quickstart's export: the stage's template, greedy
    talk = MiniGPT4.from_pretrained(folder).chat_defaults
    assert (talk.template, talk.system, talk.generation.do_sample) == ("vicuna_v0_train", "", False)
