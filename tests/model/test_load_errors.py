"""Every damaged model file is one CheckpointError that names the file and what is wrong.

Covers our save_pretrained folders (config.json, model.safetensors), training checkpoints, the
original .pth files and the LLM folder: corruptions, non-finite values and transformers' loading report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt4 import MiniGPT4
from minigpt4.config import LLMConfig
from minigpt4.convert import CheckpointError, load_eva_vit
from minigpt4.model.llm import load_llm
from minigpt4.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tiny_llm_dir):
    from minigpt4.config import model_preset
    from minigpt4.model.build import build_model

    cfg = model_preset("tiny")
    cfg.llm.path = str(tiny_llm_dir)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved") / "model"
    build_model(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(saved_folder, copy)
    return copy


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _edit_weights(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _set(mapping: dict, key: str, value) -> None:
    mapping[key] = value


CONFIG_CORRUPTIONS = {
    "empty file": (lambda p: p.write_text(""), r"config\.json is not valid JSON"),
    "truncated JSON": (lambda p: p.write_text(p.read_text()[:40]), r"config\.json is not valid JSON"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), r"config\.json is not UTF-8"),
    "JSON list instead of object": (lambda p: p.write_text("[1, 2]"), r"config\.json holds a JSON list"),
    "unknown top-level key": (lambda p: _edit_json(p, lambda m: _set(m, "extra", 1)),
                              r"config\.json: unknown key\(s\) extra"),
    "unknown model key": (lambda p: _edit_json(p, lambda m: _set(m["model"]["vision"], "colour", "red")),
                          r"config\.json: unknown config key\(s\) model\.vision\.colour"),
    "wrong type for a field": (lambda p: _edit_json(p, lambda m: _set(m["model"]["qformer"], "num_layers", "two")),
                               r"config\.json: model\.qformer\.num_layers: expected an integer, got 'two'"),
    "section is not a mapping": (lambda p: _edit_json(p, lambda m: _set(m["model"], "vision", 5)),
                                 r"config\.json: model\.vision: expected a mapping"),
    "model is not an object": (lambda p: _edit_json(p, lambda m: _set(m, "model", [])),
                               r"config\.json: 'model' must be an object"),
    "wrong format_version": (lambda p: _edit_json(p, lambda m: _set(m, "format_version", "1")),
                             r"config\.json: format_version '1' is not one of 1, 2"),
}


@pytest.mark.parametrize("case", list(CONFIG_CORRUPTIONS))
def test_damaged_config_json_is_a_checkpoint_error_naming_the_file(folder, case):
    corrupt, message = CONFIG_CORRUPTIONS[case]
    corrupt(folder / "config.json")
    with pytest.raises(CheckpointError, match=message) as err:
        MiniGPT4.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


def _nan(key: str):
    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[1] = float("nan")
    return edit


def _inf(key: str):
    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("-inf")
    return edit


WEIGHT_CORRUPTIONS = {
    "empty file": (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"not a readable safetensors file"),
    "header garbage": (lambda p: p.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json" + b"x" * 200),
                       r"not a readable safetensors file"),
    "missing tensor": (lambda p: _edit_weights(p, lambda s: s.pop("proj.bias")), r"missing keys: proj\.bias"),
    "extra tensor": (lambda p: _edit_weights(p, lambda s: _set(s, "proj.scale", torch.ones(3))),
                     r"unexpected keys: proj\.scale"),
    "extra module": (lambda p: _edit_weights(p, lambda s: _set(s, "head.weight", torch.ones(3))),
                     r"unexpected keys: head\.weight"),
    "wrong shape": (lambda p: _edit_weights(p, lambda s: _set(s, "proj.bias", torch.zeros(3))),
                    r"shape mismatches: proj\.bias \(file \(3,\), model \(64,\)\)"),
    "wrong dtype": (lambda p: _edit_weights(p, lambda s: _set(s, "proj.bias", torch.zeros(64, dtype=torch.int32))),
                    r"wrong dtypes: proj\.bias \(file torch\.int32, model torch\.float32\)"),
    "NaN value": (lambda p: _edit_weights(p, _nan("qformer.query_tokens")),
                  r"tensor qformer\.query_tokens \(1, 8, 32\) holds NaN values"),
    "infinite value": (lambda p: _edit_weights(p, _inf("proj.weight")),
                       r"tensor proj\.weight \(64, 32\) holds infinite"),
    "missing file": (lambda p: p.unlink(), r"has config\.json but no model\.safetensors"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CORRUPTIONS))
def test_damaged_model_safetensors_is_a_checkpoint_error_naming_the_file(folder, case):
    corrupt, message = WEIGHT_CORRUPTIONS[case]
    corrupt(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=message) as err:
        MiniGPT4.from_pretrained(folder)
    assert str(folder) in str(err.value)


def test_an_undamaged_folder_loads(folder):
    assert MiniGPT4.from_pretrained(folder).proj.weight.shape == (64, 32)


# ---------------------------------------------------------------------------------- training checkpoints


@pytest.fixture
def train_checkpoint(tiny_model, tmp_path):
    from minigpt4.config import TrainJobConfig, to_dict
    from minigpt4.train.optim import build_optimizer

    optimizer = build_optimizer(tiny_model, TrainJobConfig().train)
    state = {
        "format": ckpt.FORMAT, "model": ckpt.trainable_state_dict(tiny_model), "optimizer": optimizer.state_dict(),
        "scaler": None, "step": 2, "epoch": 0, "data": {"batches": 2}, "rng": [ckpt.rng_state(torch.device("cpu"))],
        "skipped": 0, "config": to_dict(TrainJobConfig()),
    }
    path = ckpt.save_atomic(state, ckpt.checkpoint_path(tmp_path, 2))
    return path, state


def test_a_complete_training_checkpoint_loads(train_checkpoint):
    path, _ = train_checkpoint
    assert ckpt.load_checkpoint(path)["step"] == 2


TRAIN_CORRUPTIONS = {
    "NaN weight": (lambda s: s["model"]["llama_proj.weight"].view(-1).__setitem__(0, float("nan")),
                   r"tensor model\.llama_proj\.weight \(64, 32\) holds NaN values"),
    "missing entry": (lambda s: s.pop("optimizer"), r"has no 'optimizer' entry"),
    "entry of the wrong type": (lambda s: _set(s, "step", "2"), r"entry 'step' is a str, expected int"),
    "weights that are not tensors": (lambda s: _set(s["model"], "llama_proj.bias", [0.0]),
                                     r"model entries \['llama_proj\.bias'\] are not tensors"),
    "config without train": (lambda s: s["config"].pop("train"), r"config\.train is missing"),
    "optimizer without state": (lambda s: s["optimizer"].pop("state"), r"optimizer entry lacks"),
}


@pytest.mark.parametrize("case", list(TRAIN_CORRUPTIONS))
def test_damaged_training_checkpoint_is_a_checkpoint_error(train_checkpoint, case):
    path, state = train_checkpoint
    corrupt, message = TRAIN_CORRUPTIONS[case]
    corrupt(state)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message) as err:
        ckpt.load_checkpoint(path)
    assert str(path) in str(err.value)


def test_truncated_training_checkpoint_is_a_checkpoint_error(train_checkpoint):
    path, _ = train_checkpoint
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)


def test_trainable_weights_of_the_wrong_dtype_are_refused(tiny_model):
    state = ckpt.trainable_state_dict(tiny_model)
    state["llama_proj.bias"] = state["llama_proj.bias"].to(torch.int64)
    with pytest.raises(CheckpointError, match=r"wrong dtype for llama_proj\.bias"):
        ckpt.load_trainable_state_dict(tiny_model, state, "ckpt.pth")


# ---------------------------------------------------------------------------------- original files


def test_nan_in_an_original_file_names_file_and_tensor(tiny_model, tmp_path):
    from tests.model.original_layout import to_original_keys

    eva = to_original_keys(tiny_model.tower_state_dict())["eva"]
    eva["blocks.1.attn.qkv.weight"].view(-1)[5] = float("inf")
    path = tmp_path / "eva_vit_g.pth"
    torch.save(eva, path)
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: tensor blocks\.1\.attn\.qkv\.weight .* infinite"):
        load_eva_vit(tiny_model, path)


# ---------------------------------------------------------------------------------- the LLM


@pytest.fixture
def llm_copy(tiny_llm_dir, tmp_path):
    copy = tmp_path / "llm"
    shutil.copytree(tiny_llm_dir, copy)
    return copy


LLM_CORRUPTIONS = {
    "missing tensor": (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
                       r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"),
    "extra tensor": (lambda s: _set(s, "model.layers.0.adapter.weight", torch.zeros(4)),
                     r"unexpected keys: model\.layers\.0\.adapter\.weight"),
    "untied head missing": (lambda s: s.pop("lm_head.weight"), r"missing keys: lm_head\.weight"),
    "wrong shape": (lambda s: _set(s, "model.norm.weight", torch.ones(7)),
                    r"shape mismatches: model\.norm\.weight \(file \(7,\), model \(64,\)\)"),
    "NaN value": (_nan("model.layers.0.self_attn.q_proj.weight"),
                  r"tensor model\.layers\.0\.self_attn\.q_proj\.weight \(64, 64\) holds NaN"),
}


@pytest.mark.parametrize("case", list(LLM_CORRUPTIONS))
def test_llm_loads_strictly(llm_copy, case):
    corrupt, message = LLM_CORRUPTIONS[case]
    _edit_weights(llm_copy / "model.safetensors", corrupt)
    with pytest.raises(CheckpointError, match=message) as err:
        load_llm(LLMConfig(path=str(llm_copy)))
    assert str(llm_copy) in str(err.value)


def test_llm_may_leave_out_a_tied_head_and_carry_rotary_buffers(llm_copy):
    """The two legitimate differences: a tied lm_head is not stored; Vicuna v0 stores rotary inv_freq."""
    _edit_json(llm_copy / "config.json", lambda c: _set(c, "tie_word_embeddings", True))

    def edit(state):
        state.pop("lm_head.weight")
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _edit_weights(llm_copy / "model.safetensors", edit)
    llm, _ = load_llm(LLMConfig(path=str(llm_copy)))
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight


def test_loading_report_is_checked_even_when_transformers_only_logs(tiny_llm_dir):
    """The report check itself: keys transformers merely logs are errors, the allowed ones pass."""
    from minigpt4.model.llm import check_loading_report

    llm, _ = load_llm(LLMConfig(path=str(tiny_llm_dir)))
    clean = {"missing_keys": set(), "unexpected_keys": {"model.layers.3.self_attn.rotary_emb.inv_freq"},
             "mismatched_keys": set(), "error_msgs": []}
    check_loading_report(llm, clean, "llm")
    with pytest.raises(CheckpointError,
                       match=r"shape mismatches: model\.norm\.weight \(file \(7,\), model \(64,\)\); boom"):
        check_loading_report(llm, {**clean, "mismatched_keys": {("model.norm.weight", (7,), (64,))},
                                   "error_msgs": ["boom"]}, "llm")


# ---------------------------------------------------------------------------------- recorded chat defaults


CHAT_CORRUPTIONS = {
    "truncated generation_config.json": ("generation_config.json", lambda p: p.write_text('{"do_sample": tr'),
                                         r"generation_config\.json is not valid JSON"),
    "generation_config.json list": ("generation_config.json", lambda p: p.write_text("[]"),
                                    r"generation_config\.json holds a JSON list"),
    "unknown decoding key": ("generation_config.json", lambda p: _edit_json(p, lambda g: _set(g, "typical_p", 0.5)),
                             r"generation_config\.json: unknown decoding setting\(s\) typical_p"),
    "wrong decoding type": ("generation_config.json", lambda p: _edit_json(p, lambda g: _set(g, "do_sample", "yes")),
                            r"generation_config\.json: do_sample: expected true/false, got 'yes'"),
    "decoding out of range": ("generation_config.json", lambda p: _edit_json(p, lambda g: _set(g, "top_p", 1.5)),
                              r"generation_config\.json: GenerationSettings\.top_p=1\.5 must be in \(0, 1\]"),
    "unknown template": ("config.json", lambda p: _edit_json(p, lambda m: _set(m["chat"], "template", "alpaca")),
                         r"config\.json: chat: template 'alpaca' is not one of"),
    "chat entry of the wrong shape": ("config.json", lambda p: _edit_json(p, lambda m: _set(m, "chat", "vicuna")),
                                      r"config\.json: 'chat' must be an object with template and system"),
}


@pytest.mark.parametrize("case", list(CHAT_CORRUPTIONS))
def test_damaged_chat_defaults_are_a_checkpoint_error(folder, case):
    name, corrupt, message = CHAT_CORRUPTIONS[case]
    corrupt(folder / name)
    with pytest.raises(CheckpointError, match=message):
        MiniGPT4.from_pretrained(folder)


def test_a_folder_saved_before_chat_defaults_gets_the_release_ones_and_says_so(folder):
    _edit_json(folder / "config.json", lambda m: m.pop("chat"))
    (folder / "generation_config.json").unlink()
    talk = MiniGPT4.from_pretrained(folder).chat_defaults
    assert talk.template == "vicuna_v0" and talk.generation.do_sample and not talk.generation_recorded
    assert "records none" in talk.template_source and "has no generation_config.json" in talk.generation_source
