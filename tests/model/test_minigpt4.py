"""MiniGPT4: the loss as the original computes it, what trains, modes, dtypes, our save format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt4 import MiniGPT4
from minigpt4.processing.image import eval_transform
from minigpt4.processing.prompt import IGNORE_INDEX, VICUNA_V0_TEMPLATE, layout_batch

STAGE2_PROMPT = VICUNA_V0_TEMPLATE.format("<Img><ImageHere></Img> Describe this image in detail.")


@pytest.fixture
def pixels(photo):
    return torch.stack([eval_transform()(photo), eval_transform()(photo.rotate(90))])


def _reference_loss(model, pixels, texts, prompt, end_sym, max_txt_len):
    """The original forward written out by hand: concat [BOS][p_before][img][p_after][text], full logits."""
    tok = model.tokenizer
    img = model.encode_images(pixels)
    embed = model.llm.get_input_embeddings()
    batch = pixels.shape[0]
    before, after = prompt.split("<ImageHere>") if prompt else ("", "")
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False).input_ids] if s else [[]], dtype=torch.long)  # noqa: E731
    p_before, p_after = embed(ids(before)).expand(batch, -1, -1), embed(ids(after)).expand(batch, -1, -1)
    tok.padding_side = "right"
    text = tok([t + end_sym for t in texts], return_tensors="pt", padding="longest", truncation=True,
               max_length=max_txt_len, add_special_tokens=False)
    targets = text.input_ids.masked_fill(text.input_ids == tok.pad_token_id, IGNORE_INDEX)
    bos = embed(torch.full((batch, 1), tok.bos_token_id))
    prefix = 1 + p_before.shape[1] + img.shape[1] + p_after.shape[1]
    inputs = torch.cat([bos, p_before, img, p_after, embed(text.input_ids)], dim=1)
    mask = torch.cat([torch.ones(batch, prefix, dtype=torch.long), text.attention_mask], dim=1)
    labels = torch.cat([torch.full((batch, prefix), IGNORE_INDEX), targets], dim=1)
    logits = model.llm(inputs_embeds=inputs, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize(
    "prompt,end_sym,max_txt_len",
    [(None, "\n", 32), (STAGE2_PROMPT, "###", 160), (STAGE2_PROMPT, "###", 3)],
    ids=["stage1", "stage2", "stage2-truncated"],
)
def test_loss_equals_the_original_computation(tiny_model, pixels, prompt, end_sym, max_txt_len):
    texts = ["a cat lying on a red blanket", "the dog runs"]
    with torch.no_grad():
        ours = tiny_model.loss(pixels, texts, prompt=prompt, end_sym=end_sym, max_txt_len=max_txt_len)
        reference = _reference_loss(tiny_model, pixels, texts, prompt, end_sym, max_txt_len)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_layout_masks_everything_but_the_target(tiny_model):
    tok = tiny_model.tokenizer
    batch = layout_batch(tok, ["a cat", "the dog runs in the park"], 8, STAGE2_PROMPT, "###", 160)
    before = tok("###Human: <Img>", add_special_tokens=False).input_ids
    row = batch.labels[0]
    start = 1 + len(before)
    assert batch.input_ids[0, 0] == tok.bos_token_id
    assert batch.image_mask[0, start:start + 8].all() and batch.image_mask.sum() == 16
    target = tok("a cat###", add_special_tokens=False).input_ids
    learned = row[row != IGNORE_INDEX].tolist()
    assert learned == target
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()  # right padding on the short row
    assert batch.attention_mask[0, -1] == 0 and batch.labels[0, -1] == IGNORE_INDEX


def test_eos_in_the_target_is_not_learned(tiny_model):
    """pad == eos in the original, so an eos inside a target is masked like padding."""
    tok = tiny_model.tokenizer
    batch = layout_batch(tok, [f"a cat{tok.eos_token}"], 8, None, "\n", 32)
    assert tok.eos_token_id in batch.input_ids[0].tolist()
    assert tok.eos_token_id not in batch.labels[0].tolist()


def test_backward_changes_the_projection_and_nothing_else(tiny_model, pixels):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    tiny_model.train()
    loss = tiny_model.loss(pixels, ["a cat", "a dog"])
    loss.backward()
    optimizer.step()
    changed = {n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"proj.weight", "proj.bias"}
    assert all(p.grad is None for n, p in tiny_model.named_parameters() if not n.startswith("proj."))


def test_train_mode_keeps_frozen_towers_in_eval(tiny_model):
    tiny_model.train()
    assert tiny_model.training and tiny_model.proj.training
    assert not tiny_model.vision.training and not tiny_model.qformer.training and not tiny_model.llm.training
    assert "train" not in vars(tiny_model.qformer)  # no monkey-patched train()


def test_trainable_qformer_preset_trains_it(tiny_config, pixels):
    from minigpt4.model.build import build_model

    tiny_config.qformer.trainable = True
    model = build_model(tiny_config)
    model.train()
    assert model.qformer.training
    model.loss(pixels, ["a cat", "a dog"]).backward()
    assert model.qformer.query_tokens.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())


def test_save_and_load_pretrained_gives_identical_outputs(tiny_model, pixels, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = MiniGPT4.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_images(pixels), loaded.encode_images(pixels))
        assert torch.equal(tiny_model.loss(pixels, ["a cat", "a dog"]), loaded.loss(pixels, ["a cat", "a dog"]))
    assert not (tmp_path / "ckpt" / "llm").exists()  # the LLM is referenced by path by default


def test_save_pretrained_can_include_the_llm(tiny_model, pixels, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt", include_llm=True)
    loaded = MiniGPT4.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.llm.path == str(tmp_path / "ckpt" / "llm")
    with torch.no_grad():
        assert torch.equal(tiny_model.loss(pixels, ["a cat", "a dog"]), loaded.loss(pixels, ["a cat", "a dog"]))


def test_from_pretrained_rejects_a_tampered_weights_file(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from minigpt4.convert import CheckpointError

    tiny_model.save_pretrained(tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    del state["qformer.layernorm.bias"]
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: qformer\.layernorm\.bias"):
        MiniGPT4.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loss_is_close_to_fp32(tiny_config, pixels, dtype):
    from minigpt4.model.build import build_model

    torch.manual_seed(0)
    reference = build_model(tiny_config)
    with torch.no_grad():
        expected = reference.loss(pixels, ["a cat", "a dog"])
        half = MiniGPT4(tiny_config, reference.llm, reference.tokenizer)
        half.load_state_dict(reference.state_dict())
        half.place("cpu", dtype)
        assert half.vision.embeddings.class_embedding.dtype == dtype and half.proj.weight.dtype == torch.float32
        actual = half.loss(pixels, ["a cat", "a dog"])
    assert abs(actual.item() - expected.item()) / expected.item() < 0.02


def test_quantization_without_a_gpu_is_a_clear_error(tiny_config):
    from minigpt4.model.build import build_model

    from minigpt4.config import ConfigError

    tiny_config.llm.quantization = "bnb_8bit"
    with pytest.raises(ConfigError, match="model.llm.quantization='bnb_8bit' needs bitsandbytes on a CUDA GPU"):
        build_model(tiny_config)


def test_missing_llm_folder_names_the_field(tiny_config, tmp_path):
    from minigpt4.model.build import build_model

    tiny_config.llm.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.llm.path="):
        build_model(tiny_config)


def test_npu_device_without_torch_npu_says_what_is_missing(tiny_config):
    from minigpt4.model.build import build_model

    from minigpt4.config import ConfigError

    tiny_config.device = "npu:0"
    with pytest.raises(ConfigError, match="model.device='npu:0' needs the torch_npu package"):
        build_model(tiny_config)
