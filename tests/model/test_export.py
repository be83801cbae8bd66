"""`minigpt4 export --format transformers`: a folder plain transformers loads and answers with as `minigpt4 chat`."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration

from minigpt4.chat import Chat
from minigpt4.cli import main
from minigpt4.config import ConfigError, model_preset
from minigpt4.export import IMAGE_TOKEN, build_inputs, check_exportable, export_transformers
from minigpt4.model.minigpt4 import MiniGPT4
from minigpt4.processing.image import eval_transform
from minigpt4.processing.prompt import collate_layouts, layout_sample

QUESTION = "What is in the picture?"


@pytest.fixture
def exported(tiny_model, tmp_path):
    out = tmp_path / "hf"
    report = export_transformers(tiny_model, out)
    return tiny_model, out, report


def _card_namespace(folder) -> dict:
    """The model card's Python block, executed: it imports transformers, torch and PIL only."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    assert "minigpt4" not in code
    namespace: dict = {"__name__": "card"}
    exec(code, namespace)
    return namespace


def test_export_loads_strictly_in_plain_transformers(exported):
    model, out, report = exported
    hf, info = Blip2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    assert hf.config.image_token_id == report.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert hf.config.num_query_tokens == model.num_image_tokens
    vocab = model.llm.get_input_embeddings().num_embeddings
    assert hf.get_input_embeddings().num_embeddings == vocab + 1 == len(processor.tokenizer)
    assert hf.generation_config.suppress_tokens == [report.image_token_id]
    assert hf.generation_config.stop_strings == ["###"]  # the vicuna_v0 template's
    assert hf.generation_config.do_sample and hf.generation_config.top_p == 0.9  # the release's decoding
    torch.testing.assert_close(hf.language_projection.weight, model.proj.weight)
    assert report.image_embeds_max_diff < 1e-4  # post_layernorm at the blocks' eps instead of 1e-5


def test_plain_transformers_logits_and_greedy_answer_equal_minigpt4_chat(exported, photo):
    model, out, report = exported
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    card = _card_namespace(out)

    pixels = processor.image_processor(photo, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels[0], eval_transform(224)(photo), rtol=0, atol=1e-5)
    prompt = card["PROMPT"].replace("{question}", QUESTION)
    input_ids = card["build_inputs"](processor.tokenizer, prompt, card["NUM_IMAGE_TOKENS"], report.image_token_id)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, input_ids=torch.tensor([input_ids])).logits[0, :, :-1]  # drop <image>
        laid = layout_sample(model.tokenizer, prompt, model.num_image_tokens)
        batch = collate_layouts([laid], 0)
        ours = model.llm(inputs_embeds=model.embed(batch, model.encode_images(pixels))).logits[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    chat = Chat(model, eval_transform(224))
    chat.upload(photo)
    chat.ask(QUESTION)
    expected = chat.answer(do_sample=False)  # up to the recorded 300 new tokens, stopping at "###"
    assert card["answer"](hf, processor, photo, QUESTION, do_sample=False) == expected


def test_card_recipe_and_build_inputs_follow_layout_sample(exported):
    model, out, report = exported
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    card = _card_namespace(out)
    prompt = "sys###Human: <Img><ImageHere></Img> one <Img><ImageHere></Img>  two###Assistant: "
    ids = build_inputs(processor.tokenizer, prompt, 3, report.image_token_id)
    assert card["build_inputs"](processor.tokenizer, prompt, 3, report.image_token_id) == ids
    laid = layout_sample(model.tokenizer, prompt, 3)
    assert [t for t, image in zip(laid.input_ids, laid.image_mask) if not image] == [
        t for t in ids if t != report.image_token_id]
    assert [t == report.image_token_id for t in ids] == laid.image_mask
    assert ids[0] == model.tokenizer.bos_token_id


def test_efficientnet_tower_and_merge4_are_refused_in_one_line(tiny_model, tmp_path, capsys):
    cfg = model_preset("embedded")
    with pytest.raises(ConfigError, match=r"^model.vision.arch=efficientnet_lite0 cannot be exported") as err:
        check_exportable(cfg)
    assert "\n" not in str(err.value) and "quickstart --tower vit" in str(err.value)
    with pytest.raises(ConfigError, match=r"^model.connector=merge4 cannot be exported"):
        check_exportable(model_preset("minigpt4-llama2-7b"))
    # From the command: refused from the checkpoint's config, before any model is loaded.
    tiny_model.config.vision.arch = "efficientnet_lite0"
    tiny_model.save_pretrained(tmp_path / "ckpt")
    args = ["export", "--format", "transformers", str(tmp_path / "hf"), "--checkpoint", str(tmp_path / "ckpt")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.vision.arch=efficientnet_lite0 cannot be exported")
    assert not (tmp_path / "hf").exists()


def test_round_trip_from_pretrained_reads_the_export_back_identically(exported, tmp_path, photo):
    model, out, _ = exported
    model.chat_defaults = model.chat_defaults.replace(template="vicuna_v0_train", system="")
    export_transformers(model, tmp_path / "again")
    back = MiniGPT4.from_pretrained(tmp_path / "again")
    assert back.tower_state_dict().keys() == model.tower_state_dict().keys()
    for key, tensor in model.tower_state_dict().items():
        assert torch.equal(back.tower_state_dict()[key], tensor), key
    for key, tensor in model.llm.state_dict().items():
        assert torch.equal(back.llm.state_dict()[key], tensor), key
    assert back.config.vision == model.config.vision and back.config.qformer == model.config.qformer
    assert back.chat_defaults.record() == model.chat_defaults.record()
    text = "a <image> tag ###Human: typed"
    assert back.tokenizer(text).input_ids == model.tokenizer(text).input_ids  # the image token is gone again
    chat, again = Chat(model, eval_transform(224)), Chat(back, eval_transform(224))
    for c in (chat, again):
        c.upload(photo)
        c.ask(QUESTION)
    assert again.answer(do_sample=False, max_new_tokens=8) == chat.answer(do_sample=False, max_new_tokens=8)
    # and our own format from there: the LLM goes with it, as the export folder is no LLM folder
    back.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "llm" / "config.json").is_file()


def test_export_command_writes_a_loadable_folder_from_a_checkpoint(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert main(["export", "--format", "transformers", str(out), "--checkpoint", str(tmp_path / "ckpt")]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert "image token id" in capsys.readouterr().err
    assert main(["export", "--format", "transformers", str(out), "--checkpoint", str(tmp_path / "ckpt")]) == 2
    error = f"error: {out} is not empty: give a new folder, or --overwrite"
    assert capsys.readouterr().err.strip().splitlines() == [error]


@pytest.fixture
def tied_llm_dir(tiny_llm_dir, tmp_path):
    """The tiny LLM with its head sharing the input embeddings (as SmolLM2's does)."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    llm_dir = tmp_path / "tied_llm"
    shutil.copytree(tiny_llm_dir, llm_dir)
    llm_config = LlamaConfig.from_pretrained(tiny_llm_dir)
    llm_config.tie_word_embeddings = True
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(llm_config).save_pretrained(llm_dir)
    return llm_dir


@pytest.fixture
def tied_tiny_model(tied_llm_dir):
    """The tiny model over the tied LLM."""
    from minigpt4.model.build import build_model

    cfg = model_preset("tiny")
    cfg.llm.path = str(tied_llm_dir)
    torch.manual_seed(0)
    return build_model(cfg)


def test_tied_embeddings_export_strictly_and_answer_alike(tied_tiny_model, tmp_path, photo):
    model = tied_tiny_model
    report = export_transformers(model, tmp_path / "hf")
    hf, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    card = _card_namespace(tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    chat = Chat(model, eval_transform(224))
    chat.upload(photo)
    chat.ask(QUESTION)
    assert card["answer"](hf, processor, photo, QUESTION, do_sample=False) == chat.answer(do_sample=False)
    back = MiniGPT4.from_pretrained(report.directory)
    assert back.llm.get_output_embeddings().weight.data_ptr() == back.llm.get_input_embeddings().weight.data_ptr()
    for key, tensor in model.llm.state_dict().items():
        assert torch.equal(back.llm.state_dict()[key], tensor), key


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformers_only.py"
# Runs the example with every import of minigpt4 failing, so a script that reached for it could not pass.
NO_MINIGPT4 = """
import runpy, sys

class NoMiniGPT4:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "minigpt4":
            raise ImportError("the transformers-only example imported " + name)

sys.meta_path.insert(0, NoMiniGPT4())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def quickstart_vit_folder(tiny_llm_dir, tmp_path):
    """A tiny model of the quickstart's ViT form (preset embedded-vit at test dims: patch 32 at 224 px, the blocks at
    ln_vision's eps, a trainable Q-Former cross-attending in every layer), saved as the quickstart saves
    its model: the stage-2 template, greedy decoding."""
    from minigpt4.chat.generation import GenerationSettings
    from minigpt4.model.build import build_model

    cfg = model_preset("embedded-vit")
    cfg.vision = replace(cfg.vision, width=32, depth=2, num_heads=2, mlp_dim=64)
    cfg.qformer = replace(cfg.qformer, hidden_size=32, num_heads=4, intermediate_size=64)
    cfg.weights.vit, cfg.llm.path = "", str(tiny_llm_dir)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.chat_defaults = model.chat_defaults.replace(
        template="vicuna_v0_train", system="", generation=GenerationSettings(do_sample=False, max_new_tokens=24))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_quickstart_vit_model_exports_and_the_transformers_only_example_answers_as_chat(
        quickstart_vit_folder, tmp_path, photo, capsys):
    image = tmp_path / "photo.jpg"
    photo.save(image)
    out = tmp_path / "hf"
    assert main(["export", "--format", "transformers", str(out), "--checkpoint", str(quickstart_vit_folder)]) == 0
    # The blocks and ln_vision share one eps here, so transformers' post_layernorm is ln_vision exactly.
    diff = float(re.search(r"image embeddings within (\S+) of", capsys.readouterr().err).group(1))
    assert diff < 1e-6
    hf, info = Blip2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert hf.config.vision_config.patch_size == 32 and hf.config.qformer_config.cross_attention_frequency == 1

    assert main(["chat", "--checkpoint", str(quickstart_vit_folder), "--image", str(image), "--no-stream",
                 QUESTION]) == 0
    chat_answer = capsys.readouterr().out
    example = subprocess.run([sys.executable, "-c", NO_MINIGPT4, str(EXAMPLE), str(out), str(image), QUESTION],
                             capture_output=True, text=True, timeout=300)
    assert example.returncode == 0, example.stderr[-3000:]
    assert example.stdout == chat_answer and chat_answer.strip()
