"""Write a model's tower weights in the layouts of the released files, independently of
`minigpt4.convert` (a hand-written inverse map, so the tests do not just mirror the loader)."""

from __future__ import annotations

import re

import torch


def to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our tower state dict -> {"eva": ..., "blip2": ..., "proj": ...} with the original key names."""
    eva, blip2, proj = {}, {}, {}
    qformer_map = [
        (r"^embed_norm\.", "embeddings.LayerNorm."),
        (r"^layers\.(\d+)\.self_attn\.(query|key|value)\.", r"encoder.layer.\1.attention.self.\2."),
        (r"^layers\.(\d+)\.self_attn\.out\.", r"encoder.layer.\1.attention.output.dense."),
        (r"^layers\.(\d+)\.self_attn\.norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
        (r"^layers\.(\d+)\.cross_attn\.(query|key|value)\.", r"encoder.layer.\1.crossattention.self.\2."),
        (r"^layers\.(\d+)\.cross_attn\.out\.", r"encoder.layer.\1.crossattention.output.dense."),
        (r"^layers\.(\d+)\.cross_attn\.norm\.", r"encoder.layer.\1.crossattention.output.LayerNorm."),
        (r"^layers\.(\d+)\.ffn\.fc1\.", r"encoder.layer.\1.intermediate_query.dense."),
        (r"^layers\.(\d+)\.ffn\.fc2\.", r"encoder.layer.\1.output_query.dense."),
        (r"^layers\.(\d+)\.ffn\.norm\.", r"encoder.layer.\1.output_query.LayerNorm."),
    ]
    for key, tensor in state.items():
        tensor = tensor.detach().clone()
        if key.startswith("vision."):
            eva[key.removeprefix("vision.")] = tensor
        elif key.startswith("ln_vision."):
            blip2[key] = tensor
        elif key == "qformer.query_tokens":
            blip2["query_tokens"] = tensor
        elif key.startswith("qformer."):
            rest = key.removeprefix("qformer.")
            for pattern, repl in qformer_map:
                new, hits = re.subn(pattern, repl, rest)
                if hits:
                    blip2["Qformer.bert." + new] = tensor
                    break
            else:
                raise KeyError(key)
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
