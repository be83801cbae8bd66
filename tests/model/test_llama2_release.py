"""The Llama-2 release: the merge4 connector, its preset, its training loss and its projection file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.config import ConfigError, model_config, model_preset
from minigpt4.convert import CheckpointError, load_projection
from minigpt4.model.build import build_model, random_parts
from minigpt4.model.minigpt4 import MiniGPT4, merge_patch_tokens
from minigpt4.processing.image import eval_transform
from minigpt4.processing.prompt import IGNORE_INDEX, LLAMA2_TEMPLATE

from .original_layout import to_original_keys

PROMPT = LLAMA2_TEMPLATE.format("<Img><ImageHere></Img> Describe this image in detail.")


@pytest.fixture
def pixels(photo):
    return torch.stack([eval_transform()(photo), eval_transform()(photo.rotate(90))])


@pytest.fixture
def merge_model(tiny_llama2_config):
    torch.manual_seed(0)
    return build_model(tiny_llama2_config)


def test_preset_is_the_llama2_release():
    llama2, v0 = model_preset("minigpt4-llama2-7b"), model_preset("minigpt4-7b")
    assert llama2.connector == "merge4" and v0.connector == "qformer"
    assert llama2.llm.pad_token == "$$" and v0.llm.pad_token == ""
    assert llama2.vision == v0.vision  # the same EVA-ViT-g
    assert (llama2.num_image_tokens, llama2.image_feature_width) == (64, 5632)
    assert (v0.num_image_tokens, v0.image_feature_width) == (32, 768)


@pytest.mark.parametrize("overrides,match", [
    (["vision.arch=efficientnet_lite0"], "needs vision.arch=eva_vit_g"),
    (["vision.image_size=210"], "divisible by 4, but vision.image_size=210 gives 225"),
    (["qformer.trainable=true"], "has no Q-Former"),
    (["connector=perceiver"], "connector: 'perceiver' is not one of"),
])
def test_bad_merge_configs_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        model_config("minigpt4-llama2-7b", overrides=overrides)


def test_merge_drops_cls_and_concatenates_four_consecutive_tokens():
    tokens = torch.arange(2 * 257 * 3, dtype=torch.float32).reshape(2, 257, 3)
    merged = merge_patch_tokens(tokens)
    assert merged.shape == (2, 64, 12)
    for b in range(2):
        for j in (0, 1, 63):
            expected = torch.cat([tokens[b, 1 + 4 * j + k] for k in range(4)])
            assert torch.equal(merged[b, j], expected)
    assert merged[0, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0]


def test_merge_model_has_no_qformer_and_encodes_64_tokens(merge_model, pixels):
    assert merge_model.qformer is None and merge_model.num_image_tokens == 64
    assert not any(k.startswith("qformer.") for k in merge_model.tower_state_dict())
    assert merge_model.proj.in_features == 4 * merge_model.config.vision.width
    with torch.no_grad():
        tokens = merge_model.ln_vision(merge_model.vision(pixels))  # (B, 257, 32)
        expected = merge_model.proj(tokens[:, 1:].reshape(2, 64, 4 * tokens.shape[-1]))
        encoded = merge_model.encode_images(pixels)
    assert encoded.shape == (2, 64, merge_model.llm.config.hidden_size)
    torch.testing.assert_close(encoded, expected)
    assert random_parts(merge_model.config, merge_model.config.llm.path) == ["LLM", "vision tower", "projection"]


def test_release_chat_defaults(merge_model, tiny_model):
    assert merge_model.chat_defaults.template == "llama2"
    assert merge_model.chat_defaults.generation.repetition_penalty == 1.05
    assert tiny_model.chat_defaults.template == "vicuna_v0"


def test_pad_token_is_the_vocabulary_dollar_token(merge_model, tiny_llm_dir):
    tok = merge_model.tokenizer
    assert tok.pad_token == "$$" and tok.pad_token_id == tok.convert_tokens_to_ids("$$")
    assert tok.pad_token_id not in (tok.eos_token_id, tok.unk_token_id)
    from minigpt4.model.llm import load_tokenizer

    with pytest.raises(ConfigError, match=r"model.llm.pad_token='\$\$' is not a token of the tokenizer"):
        load_tokenizer(tiny_llm_dir, "$$")  # the v0 tiny vocabulary has no "$$" piece


def _reference_loss(model, pixels, texts, prompt, max_txt_len):
    """The release's forward written out by hand: merged ViT tokens, per row [BOS][prompt + image][answer</s>]
    with the answer right after the prompt, then right padding; targets -100 except the answer tokens."""
    tok = model.tokenizer
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        tokens = model.ln_vision(model.vision(pixels))[:, 1:]
    img = model.proj(tokens.reshape(tokens.shape[0], -1, 4 * tokens.shape[-1]))
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False).input_ids], dtype=torch.long)  # noqa: E731
    before, after = prompt.split("<ImageHere>")
    answers = tok([t + "</s>" for t in texts], return_tensors="pt", padding="longest", truncation=True,
                  max_length=max_txt_len, add_special_tokens=False)
    targets = answers.input_ids.masked_fill(answers.input_ids == tok.pad_token_id, IGNORE_INDEX)
    rows, masks, labels = [], [], []
    for i in range(len(texts)):
        cond = torch.cat([embed(ids(before))[0], img[i], embed(ids(after))[0]])
        rows.append(torch.cat([embed(torch.tensor([tok.bos_token_id])), cond, embed(answers.input_ids[i])]))
        masks.append(torch.cat([torch.ones(1 + len(cond), dtype=torch.long), answers.attention_mask[i]]))
        labels.append(torch.cat([torch.full((1 + len(cond),), IGNORE_INDEX), targets[i]]))
    inputs, mask, labels = torch.stack(rows), torch.stack(masks), torch.stack(labels)
    logits = model.llm(inputs_embeds=inputs, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("max_txt_len", [160, 3], ids=["stage2", "truncated"])
def test_merge_loss_equals_the_release_computation(merge_model, pixels, max_txt_len):
    texts = ["a cat lying on a red blanket", "the dog runs $$"]
    with torch.no_grad():
        ours = merge_model.loss(pixels, texts, prompt=PROMPT, end_sym="</s>", max_txt_len=max_txt_len)
    reference = _reference_loss(merge_model, pixels, texts, PROMPT, max_txt_len).detach()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_merge_training_changes_only_the_projection(merge_model, pixels):
    before = {n: p.detach().clone() for n, p in merge_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in merge_model.parameters() if p.requires_grad], lr=1e-2)
    merge_model.train()
    merge_model.loss(pixels, ["a cat", "a dog"], prompt=PROMPT, end_sym="</s>", max_txt_len=160).backward()
    optimizer.step()
    changed = {n for n, p in merge_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"proj.weight", "proj.bias"}


# ------------------------------------------------------------------------------- the projection file


def _release_file(path, weight, bias, **extra):
    """A projection file in the release's layout: {"model": {"llama_proj.weight", "llama_proj.bias", ...}}."""
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias, **extra}}, path)
    return path


def _meta_model(preset: str) -> MiniGPT4:
    """A model of `preset`'s real sizes (Llama-2-7b hidden size 4096) built on the meta device: no memory."""
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(hidden_size=4096, num_hidden_layers=1, num_attention_heads=32,
                                           intermediate_size=8, vocab_size=8))
        return MiniGPT4(model_preset(preset), llm, tokenizer=None, towers_on_meta=True)


def test_release_projection_file_loads_strictly_at_its_real_size(tmp_path):
    model = _meta_model("minigpt4-llama2-7b")
    weight, bias = torch.randn(4096, 5632, dtype=torch.float16), torch.randn(4096, dtype=torch.float16)
    path = _release_file(tmp_path / "pretrained_minigpt4_llama2_7b.pth", weight, bias,
                         **{"llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(64)})
    load_projection(model, path)
    assert model.proj.weight.shape == (4096, 5632)
    assert torch.equal(model.proj.weight.float(), weight.float()) and torch.equal(model.proj.bias.float(), bias.float())


@pytest.mark.parametrize("preset,file_inputs,match", [
    ("minigpt4-llama2-7b", 768, r"projection of 768-wide image features \(the qformer connector's\), but "
                                r"model.connector=merge4 gives 5632-wide ones"),
    ("minigpt4-7b", 5632, r"projection of 5632-wide image features \(the merge4 connector's\), but "
                          r"model.connector=qformer gives 768-wide ones"),
])
def test_a_file_for_the_other_connector_is_one_clear_error(tmp_path, preset, file_inputs, match):
    model = _meta_model(preset)
    path = _release_file(tmp_path / "proj.pth", torch.zeros(4096, file_inputs), torch.zeros(4096))
    with pytest.raises(CheckpointError, match=match) as err:
        load_projection(model, path)
    assert "\n" not in str(err.value)
    assert "pretrained_minigpt4_llama2_7b.pth goes with minigpt4-llama2-7b" in str(err.value)


def test_unexpected_entries_of_a_projection_file_are_named(merge_model, tmp_path):
    proj = merge_model.proj
    path = _release_file(tmp_path / "proj.pth", proj.weight.detach(), proj.bias.detach(),
                         **{"llama_model.model.embed_tokens.weight": torch.ones(8, 64)})
    with pytest.raises(CheckpointError, match="unexpected keys: llama_model.model.embed_tokens.weight"):
        load_projection(merge_model, path)


def test_from_the_released_files_without_blip2(merge_model, tiny_llama2_config, pixels, tmp_path):
    """The eva file and the projection file only; ln_vision keeps its initial 1 and 0 (no file holds it)."""
    with torch.no_grad():
        merge_model.ln_vision.weight.fill_(1.0)
        merge_model.ln_vision.bias.zero_()
    eva = to_original_keys(merge_model.tower_state_dict())["eva"]
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    _release_file(tmp_path / "proj.pth", merge_model.proj.weight.detach(), merge_model.proj.bias.detach())
    cfg = tiny_llama2_config
    cfg.weights.vit, cfg.weights.projection = str(tmp_path / "eva_vit_g.pth"), str(tmp_path / "proj.pth")
    loaded = build_model(cfg)
    assert torch.equal(loaded.ln_vision.weight, torch.ones(32)) and torch.equal(loaded.ln_vision.bias, torch.zeros(32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(pixels), merge_model.encode_images(pixels))
    assert random_parts(cfg, cfg.llm.path) == ["LLM"]
    cfg.weights.blip2 = str(tmp_path / "blip2.pth")
    with pytest.raises(ConfigError, match="model.connector=merge4 .* has no Q-Former to load it into"):
        build_model(cfg)


def test_chat_with_the_merge_model_uses_the_release_format(merge_model, photo):
    from minigpt4.chat import Chat

    chat = Chat(merge_model, eval_transform())
    chat.upload(photo)
    chat.ask("What is in the picture?")
    assert chat.prompt().endswith("<s>[INST] <Img><ImageHere></Img> What is in the picture? [/INST] ")
    answer = chat.answer(do_sample=False, max_new_tokens=4)
    assert isinstance(answer, str) and chat.messages[-1].role == "assistant"
    assert chat.prompt().endswith(f" [/INST] {chat.messages[-1].text}")


def test_llama2_stage2_checkpoints_record_the_llama2_template(tiny_model):
    """The layout trained decides (the model's own defaults here are vicuna_v0's)."""
    from minigpt4.config import train_config
    from minigpt4.train.checkpoint import chat_record

    job = train_config(None, ["preset=tiny", "data.prompts=default", f"data.prompt_template='{LLAMA2_TEMPLATE}'",
                              "data.end_sym=</s>"])
    assert chat_record(job, tiny_model)["template"] == "llama2"
    job.data.end_sym = "###"  # a layout no template matches: the model's own, with a warning
    assert chat_record(job, tiny_model)["template"] == "vicuna_v0"
    job.data.prompts = ""
    assert chat_record(job, tiny_model)["template"] == "caption"


def test_cached_features_of_merged_tokens_have_their_own_fingerprint(merge_model, tiny_llama2_config):
    """The same tower weights give merged tokens here and raw tokens with a trainable Q-Former: never mixed up."""
    from minigpt4.feature_cache.layout import fingerprint

    tiny_llama2_config.connector, tiny_llama2_config.qformer.trainable = "qformer", True
    torch.manual_seed(0)
    trainable = build_model(tiny_llama2_config)
    trainable.vision.load_state_dict(merge_model.vision.state_dict())
    trainable.ln_vision.load_state_dict(merge_model.ln_vision.state_dict())
    transform = eval_transform()
    assert fingerprint(merge_model, transform) != fingerprint(trainable, transform)
