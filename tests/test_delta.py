"""`apply-delta` / `make-delta` on a tiny random LLaMA in mixed `.bin` / `.safetensors` shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt4.cli import main
from minigpt4.delta import DeltaError, apply_delta, check_applied, make_delta


def tiny_llama_state(vocab: int, seed: int, dtype=torch.float16) -> tuple[dict[str, torch.Tensor], dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(seed)
    state = {k: v.to(dtype).clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    return state, config.to_dict()


def write_sharded(folder: Path, state: dict[str, torch.Tensor], config: dict, formats: list[str]) -> Path:
    """Shards in the given formats (".bin" / ".safetensors") in turn, one index mapping to all of them."""
    folder.mkdir(parents=True)
    keys = list(state)
    per = -(-len(keys) // len(formats))
    weight_map = {}
    for i, fmt in enumerate(formats):
        name = f"part-{i:02d}{fmt}"
        chunk = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        if fmt == ".bin":
            torch.save(chunk, folder / name)
        else:
            save_file(chunk, str(folder / name))
        weight_map.update(dict.fromkeys(chunk, name))
    index = "pytorch_model.bin.index.json" if formats[0] == ".bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"from": folder.name}))
    return folder


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in set(index["weight_map"].values()):
        out.update(load_file(str(folder / shard)))
    return out


@pytest.fixture
def models(tmp_path):
    """Base (vocab 400, .bin/.safetensors/.bin shards) and a delta (vocab 401: a pad row) in .safetensors/.bin."""
    base, base_cfg = tiny_llama_state(400, seed=0)
    delta, delta_cfg = tiny_llama_state(401, seed=1)
    base_dir = write_sharded(tmp_path / "base", base, base_cfg, [".bin", ".safetensors", ".bin"])
    delta_dir = write_sharded(tmp_path / "delta", delta, delta_cfg, [".safetensors", ".bin"])
    return tmp_path, base, delta, base_dir, delta_dir


def test_apply_delta_is_bit_identical_to_the_in_memory_sum(models):
    tmp_path, base, delta, base_dir, delta_dir = models
    out = apply_delta(base_dir, delta_dir, tmp_path / "out", max_shard_bytes=20_000)
    merged = read_all(out)
    assert set(merged) == set(delta)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(out.glob("*.tmp"))
    for key, tensor in merged.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = delta[key].clone()
            expected[:400] += base[key]
        else:
            expected = base[key] + delta[key]
        assert tensor.dtype == torch.float16 and torch.equal(tensor, expected), key
    assert merged["lm_head.weight"].shape == (401, 32)
    assert torch.equal(merged["lm_head.weight"][400], delta["lm_head.weight"][400])  # the pad row, as in the delta
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 401  # the delta's config
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "delta"}
    assert check_applied(base_dir, delta_dir, out) == len(delta)


def test_make_delta_then_apply_delta_returns_the_original(tmp_path):
    base, cfg = tiny_llama_state(400, seed=0)
    tuned, tuned_cfg = tiny_llama_state(401, seed=1)
    # A fine-tune stays close to its base: target = base + a small change (and one new vocabulary row).
    target = {k: v.clone() for k, v in tuned.items()}
    for key, tensor in base.items():
        target[key][: tensor.shape[0]] = tensor + (tuned[key][: tensor.shape[0]] * 0.01).to(tensor.dtype)
    base_dir = write_sharded(tmp_path / "base", base, cfg, [".safetensors", ".bin"])
    target_dir = write_sharded(tmp_path / "target", target, tuned_cfg, [".bin", ".safetensors"])
    make_delta(base_dir, target_dir, tmp_path / "made")
    back = read_all(apply_delta(base_dir, tmp_path / "made", tmp_path / "back"))
    assert set(back) == set(target)
    for key, tensor in back.items():
        # fp16 (t - b) + b is t exactly whenever t - b is exact (t and b within a factor of 2: nearly all
        # elements of a fine-tune); otherwise within one rounding.
        assert torch.allclose(tensor.float(), target[key].float(), rtol=1e-3, atol=1e-6), key
    same = sum(int((back[k] == target[k]).sum()) for k in target) / sum(t.numel() for t in target.values())
    assert same > 0.99, same
    assert torch.equal(back["lm_head.weight"][400], target["lm_head.weight"][400])


def test_cli_apply_delta_with_check(models, capsys):
    tmp_path, _, _, base_dir, delta_dir = models
    code = main(["apply-delta", "--base", str(base_dir), "--delta", str(delta_dir), "--output",
                 str(tmp_path / "cli"), "--check"])
    assert code == 0
    assert f"checked: all 21 tensors of {tmp_path / 'cli'} equal base + delta" in capsys.readouterr().err


def test_check_finds_a_changed_output_tensor(models):
    tmp_path, _, _, base_dir, delta_dir = models
    out = apply_delta(base_dir, delta_dir, tmp_path / "out")
    shard = out / "model-00001-of-00001.safetensors"
    tensors = load_file(str(shard))
    key = sorted(tensors)[0]
    tensors[key][0, 0] += 1
    save_file(tensors, str(shard))
    with pytest.raises(DeltaError, match=f"tensor {key} in .* differs from base \\+ delta"):
        check_applied(base_dir, delta_dir, out)


@pytest.mark.parametrize("change, message", [
    ("drop", "tensor model.norm.weight is in the base .* but not in the delta"),
    ("shape", r"tensor model.norm.weight: shape \(31,\) in .*delta, \(32,\) in the base"),
    ("dtype", "tensor model.norm.weight: dtype torch.float32 in .*delta, torch.float16 in the base"),
])
def test_mismatch_is_one_error_naming_the_tensor(tmp_path, change, message, capsys):
    base, cfg = tiny_llama_state(400, seed=0)
    delta, _ = tiny_llama_state(400, seed=1)
    if change == "drop":
        del delta["model.norm.weight"]
    elif change == "shape":
        delta["model.norm.weight"] = delta["model.norm.weight"][:31].clone()
    else:
        delta["model.norm.weight"] = delta["model.norm.weight"].float()
    base_dir = write_sharded(tmp_path / "base", base, cfg, [".safetensors"])
    delta_dir = write_sharded(tmp_path / "delta", delta, cfg, [".bin"])
    with pytest.raises(DeltaError, match=message):
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    code = main(["apply-delta", "--base", str(base_dir), "--delta", str(delta_dir), "--output", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: tensor model.norm.weight")


def test_single_file_folders_bf16_and_a_non_empty_output_are_handled(tmp_path):
    base, cfg = tiny_llama_state(400, seed=0, dtype=torch.bfloat16)
    delta, _ = tiny_llama_state(400, seed=1, dtype=torch.bfloat16)
    (tmp_path / "base").mkdir()
    (tmp_path / "delta").mkdir()
    torch.save(base, tmp_path / "base" / "pytorch_model.bin")
    save_file(delta, str(tmp_path / "delta" / "model.safetensors"))
    merged = read_all(apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out"))
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], base[k] + delta[k]) for k in base)
    with pytest.raises(DeltaError, match="is not empty; choose a new output folder"):
        apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
