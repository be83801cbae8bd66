"""model.llm.quantization: int8 weight-only through torchao on the CPU (the embedded SmolLM2's memory and greedy
tokens against fp32), bitsandbytes refused without CUDA, and what a quantized LLM can and cannot do (chat,
train the projection, save, export)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt4.cli import main
from minigpt4.config import ConfigError, LLMConfig, model_config, train_config
from minigpt4.convert import CheckpointError
from minigpt4.model.build import build_model
from minigpt4.model.llm import is_quantized, load_llm, stored_bytes, unwrapped_tensors
from minigpt4.model.minigpt4 import MiniGPT4

pytest.importorskip("torchao")  # a dependency (pyproject.toml); the skip only guards a partial install

# A fixed chat prompt for the embedded LLM. Measured on the CI machine (x86-64, torch 2.14.1, torchao 0.18):
# int8's 32 greedy tokens equal fp32's, and int8 picks fp32's token at every position of fp32's continuation
# (teacher-forced top-1 agreement 1.0; over 5 such prompts the lowest was 0.94). The floors leave room for other
# CPUs' kernels; benchmarks/quantization.py measures 20 prompts.
PROMPT = "Describe a red circle and a blue square on a white background."
NEW_TOKENS = 32
PREFIX_FLOOR = 24
TEACHER_FORCED_FLOOR = 0.9


@pytest.fixture(scope="module")
def smollm2_fp32_int8():
    from minigpt4.embedded import prepare_smollm2

    path = str(prepare_smollm2())
    fp32, tokenizer = load_llm(LLMConfig(path=path))
    int8, _ = load_llm(LLMConfig(path=path, quantization="int8"))
    return fp32, int8, tokenizer


def _linear_weight_bytes(llm) -> int:
    """The decoder layers' Linear weights (SmolLM2's head is its tied embedding matrix, which stays fp32)."""
    weights = {name: m.weight for name, m in llm.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not llm.get_output_embeddings()}
    return sum(t.numel() * t.element_size() for t in unwrapped_tensors(weights).values())


def test_int8_stores_the_embedded_llm_in_a_quarter_of_the_linear_bytes(smollm2_fp32_int8):
    fp32, int8, _ = smollm2_fp32_int8
    assert is_quantized(int8) and not is_quantized(fp32)
    layer = int8.model.layers[0]
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in (layer.self_attn.q_proj, layer.mlp.down_proj))
    # int8 data plus one fp32 scale per output row: 1/4 + 1/in_features of fp32 (measured 0.257).
    ratio = _linear_weight_bytes(int8) / _linear_weight_bytes(fp32)
    assert 0.25 < ratio < 0.3, ratio
    # The tied embedding/head matrix (28 M of the 135 M weights) stays fp32, so the whole LLM shrinks less
    # (measured 0.41).
    whole = stored_bytes(int8) / stored_bytes(fp32)
    assert whole < 0.45, whole


def test_int8_greedy_tokens_agree_with_fp32(smollm2_fp32_int8):
    fp32, int8, tokenizer = smollm2_fp32_int8
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = fp32.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)[0, ids.shape[1]:]
        answer = int8.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)[0, ids.shape[1]:]
        forced = int8(torch.cat([ids[0], expected])[None]).logits[0, ids.shape[1] - 1:-1].argmax(-1)
    assert len(expected) == NEW_TOKENS  # the prompt gives a full-length answer, so all 32 positions count
    same = answer[:NEW_TOKENS] == expected[:len(answer)]
    prefix = int(same.long().cumprod(0).sum())
    assert prefix >= PREFIX_FLOOR, (prefix, tokenizer.decode(expected), tokenizer.decode(answer))
    assert (forced == expected).float().mean().item() >= TEACHER_FORCED_FLOOR


@pytest.mark.parametrize("value", ["bnb_8bit", "bnb_4bit"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_bitsandbytes_without_cuda_is_one_line_naming_field_value_and_fix(value, tiny_llm_dir, capsys):
    assert main(["chat", "--preset", "tiny", f"llm.path={tiny_llm_dir}", f"llm.quantization={value}", "hi"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"error: model.llm.quantization='{value}' needs bitsandbytes on a CUDA GPU, but the device "
                         "is cpu: use model.llm.quantization=int8 (torchao int8 weights, any device) or none")
    assert not any(line.startswith("error:") for line in lines[:-1])


@pytest.mark.parametrize("make, message", [
    (lambda: model_config("tiny", overrides=["llm.quantization=8bit"]),
     "llm.quantization: '8bit' is not one of ['none', 'int8', 'bnb_8bit', 'bnb_4bit']"),
    (lambda: model_config("tiny", overrides=["llm.quantization=int8", "llm.device_map=auto"]),
     "model.llm.device_map='auto' with model.llm.quantization='int8': a quantized LLM loads whole"),
    (lambda: train_config(None, ["preset=tiny", "model.llm.quantization=int8", "train.strategy=fsdp"]),
     "train.strategy=fsdp with model.llm.quantization='int8': FSDP cannot shard a quantized LLM"),
])
def test_combinations_a_quantized_llm_cannot_run_are_refused_when_read(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.fixture
def tiny_int8(tiny_config):
    tiny_config.llm.quantization = "int8"
    torch.manual_seed(0)  # the same random towers as tiny_model
    return build_model(tiny_config)


def test_int8_tiny_model_computes_the_fp32_loss_and_trains_the_projection(tiny_int8, tiny_model):
    pixels = torch.randn(2, 3, tiny_model.config.vision.image_size, tiny_model.config.vision.image_size)
    expected = tiny_model.loss(pixels, ["a cat", "a dog"])
    actual = tiny_int8.loss(pixels, ["a cat", "a dog"])
    assert actual.item() == pytest.approx(expected.item(), rel=1e-3)
    actual.backward()
    assert tiny_int8.proj.weight.grad is not None and tiny_int8.proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in tiny_int8.llm.parameters())
    assert tiny_int8.device == tiny_model.device  # place() left the quantized LLM where it was loaded


def test_a_quantized_llm_is_not_saved_and_a_saved_folder_records_none(tiny_int8, tmp_path):
    tiny_int8.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["model"]["llm"]
    assert saved["quantization"] == "none"  # like device_map, a choice of the machine that loads it
    with pytest.raises(ConfigError, match=r"needs the LLM's full weights, but it was loaded quantized"):
        tiny_int8.save_pretrained(tmp_path / "whole", include_llm=True)
    assert not (tmp_path / "whole" / "llm").exists()
    reloaded = MiniGPT4.from_pretrained(tmp_path / "model", llm_placement=LLMConfig(quantization="int8"))
    assert is_quantized(reloaded.llm) and reloaded.config.llm.quantization == "int8"
    assert not is_quantized(MiniGPT4.from_pretrained(tmp_path / "model").llm)


def test_export_of_a_quantized_llm_is_refused_before_loading(tiny_int8, tiny_llm_dir, tmp_path, capsys):
    from minigpt4.export import export_transformers

    with pytest.raises(ConfigError, match=r"^exporting to transformers needs the LLM's full weights"):
        export_transformers(tiny_int8, tmp_path / "api")
    out = tmp_path / "hf"
    assert main(["export", str(out), f"llm.path={tiny_llm_dir}", "llm.quantization=int8", "--format", "transformers",
                 "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.llm.quantization='int8': an export holds the LLM's full weights; leave "
                   "model.llm.quantization=none"]
    assert not out.exists()


def test_a_transformers_export_does_not_load_quantized(tiny_model, tmp_path):
    from minigpt4.export import export_transformers

    export_transformers(tiny_model, tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"^model.llm.quantization='int8': .* is a transformers export, which loads "
                                          r"in full precision; use the save_pretrained folder, or quantization=none$"):
        MiniGPT4.from_pretrained(tmp_path / "hf", llm_placement=LLMConfig(quantization="int8"))


def test_nan_in_a_quantized_weight_is_still_found(tiny_llm_dir, tmp_path):
    import shutil

    broken = tmp_path / "llm"
    shutil.copytree(tiny_llm_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    # The NaN row's int8 data is garbage and its scale NaN: the scale is where it shows.
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight\.scale .* holds NaN"):
        load_llm(LLMConfig(path=str(broken), quantization="int8"))


def test_chat_command_loads_the_llm_in_int8(tiny_llm_dir, photo, tmp_path, capsys):
    image = tmp_path / "cat.jpg"
    photo.save(image)
    assert main(["chat", "--preset", "tiny", "--image", str(image), "--greedy", "--max-new-tokens", "4",
                 "--no-stream", "hi", f"llm.path={tiny_llm_dir}", "llm.quantization=int8"]) == 0
    err = capsys.readouterr().err
    assert f"(LLM {tiny_llm_dir} in int8, device cpu" in err
