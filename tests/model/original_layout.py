"""Write a model's tower weights in the layouts of the released files, independently of
`minigpt4.convert` (a hand-written inverse map, so the tests do not just mirror the loader)."""

from __future__ import annotations

import re

import torch


def to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our tower state dict (transformers' BLIP-2 module names) -> {"eva": ..., "blip2": ..., "proj": ...} with
    the original key names. A `qkv.bias` becomes EVA's q_bias and v_bias; its key third must be zero."""
    eva, blip2, proj = {}, {}, {}
    vision_map = [
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
        (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    ]
    qformer_map = [
        (r"^layernorm\.", "embeddings.LayerNorm."),
        (r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"encoder.layer.\1.\2.self."),
        (r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.", r"encoder.layer.\1.\2.output."),
        (r"^encoder\.layer\.(\d+)\.(intermediate_query|output_query)\.", r"encoder.layer.\1.\2."),
    ]

    def rename(key: str, table: list[tuple[str, str]]) -> str:
        for pattern, repl in table:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                return new
        raise KeyError(key)

    for key, tensor in state.items():
        tensor = tensor.detach().clone()
        if match := re.match(r"^vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key):
            q_bias, k_bias, v_bias = tensor.chunk(3)
            assert not k_bias.any(), f"{key}: EVA has no key bias"
            eva[f"blocks.{match.group(1)}.attn.q_bias"] = q_bias.clone()
            eva[f"blocks.{match.group(1)}.attn.v_bias"] = v_bias.clone()
        elif key.startswith("vision."):
            eva[rename(key.removeprefix("vision."), vision_map)] = tensor
        elif key.startswith("ln_vision."):
            blip2[key] = tensor
        elif key == "qformer.query_tokens":
            blip2["query_tokens"] = tensor
        elif key.startswith("qformer."):
            blip2["Qformer.bert." + rename(key.removeprefix("qformer."), qformer_map)] = tensor
        elif key.startswith("proj."):
            proj["llama_proj." + key.removeprefix("proj.")] = tensor
        else:
            raise KeyError(key)
    return {"eva": eva, "blip2": blip2, "proj": proj}


def write_original_files(model, directory, extra_eva_block: bool = True):
    """eva_vit_g.pth (+ the unused last block), blip2 {"model": ...} (+ t5_proj, position_ids),
    and a MiniGPT-4 checkpoint {"model": llama_proj + legacy buffers, "optimizer": ..., "epoch": ...}."""
    parts = to_original_keys(model.tower_state_dict())
    eva = dict(parts["eva"])
    if extra_eva_block:
        depth = model.config.vision.depth
        for key, tensor in parts["eva"].items():
            if key.startswith("blocks.0."):
                eva[key.replace("blocks.0.", f"blocks.{depth}.", 1)] = torch.randn_like(tensor)
    blip2 = dict(parts["blip2"])
    width = model.config.qformer.hidden_size
    blip2["t5_proj.weight"] = torch.randn(16, width)
    blip2["t5_proj.bias"] = torch.randn(16)
    blip2["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    proj = dict(parts["proj"])
    proj["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    proj["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    paths = {name: directory / f"{name}.pth" for name in ("eva", "blip2", "proj")}
    torch.save(eva, paths["eva"])
    torch.save({"model": blip2}, paths["blip2"])
    torch.save({"model": proj, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, paths["proj"])
    return paths
