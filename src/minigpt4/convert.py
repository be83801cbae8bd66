"""Strict loading of the original MiniGPT-4 / BLIP-2 / EVA checkpoint files.

Each loader maps the file's keys onto this package's module names (for the towers, those of
transformers' Blip2VisionModel and Blip2QFormerModel) with an explicit table, then loads every
submodule strictly: a missing, unexpected or mis-shaped tensor is an error that names
it. The keys a file holds on purpose but that are not used are listed below with the reason, and
logged when skipped. Files are read with `torch.load(weights_only=True)`: nothing is unpickled
beyond tensors and plain containers. Every floating tensor read is checked finite once, at load:
a NaN or infinity in a file is an error that names the file and the tensor.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt4.chat.defaults import ChatDefaults
from minigpt4.model.vision import interpolate_pos_embed

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of the wrong kind, or does not fit the model."""


# BLIP-2 file keys that MiniGPT-4 does not use, and why.
BLIP2_IGNORED = [
    (r"^t5_proj\.", "the FlanT5 projection of BLIP-2 (MiniGPT-4 has its own projection)"),
    (r"^t5_model\.", "the FlanT5 language model of BLIP-2"),
    (r"^Qformer\.cls\.", "the Q-Former's MLM head (text path, unused)"),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.", "Q-Former text embeddings (unused)"),
    (r"^Qformer\.bert\.embeddings\.position_ids$", "a constant buffer"),
    (r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.", "the Q-Former's text feed-forward (unused)"),
    (r"^(vision_proj|text_proj|itm_head)\.|^temp$", "BLIP-2 stage-1 contrastive/matching heads"),
]

# Entries of a MiniGPT-4 checkpoint's "model" dict besides llama_proj.*: the original runner
# saved every persistent buffer along with the trainable weights.
PROJECTION_IGNORED = [
    (r"^Qformer\.bert\.embeddings\.position_ids$", "a constant buffer saved by the original runner"),
    (r"^llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", "a constant rotary buffer"),
]

# The towers are transformers' Blip2VisionModel (`vision.*`) and Blip2QFormerModel (`qformer.*`). These tables map
# the original names onto theirs, as (original, ours) name templates: one ending in "." renames a prefix, any other
# a whole name; "{i}" stands for a block index. Read backwards, they name what a file lacks in the file's own terms.
# EVA-ViT-g: eva_vit_g.pth key (also LAVIS' `visual_encoder.*`) -> Blip2VisionModel key. `blocks.N.attn.q_bias` and
# `v_bias` have no single counterpart: they become one `qkv.bias` with a zero key third (`EVA_QV_BIAS`).
_EVA_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.attn.qkv.weight", "encoder.layers.{i}.self_attn.qkv.weight"),
    ("blocks.{i}.attn.q_bias and v_bias", "encoder.layers.{i}.self_attn.qkv.bias"),  # read backwards only
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),
]
EVA_QV_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.([qv])_bias$")

# Q-Former: original name (after "Qformer.bert.") -> Blip2QFormerModel's (after "qformer."); the rest is equal.
_QFORMER_NAMES = [
    ("embeddings.LayerNorm.", "layernorm."),
    ("encoder.layer.{i}.attention.self.", "encoder.layer.{i}.attention.attention."),
    ("encoder.layer.{i}.crossattention.self.", "encoder.layer.{i}.crossattention.attention."),
]

# Folders saved before the towers were transformers' (format_version 1) and training checkpoints of a trainable
# Q-Former from then: our former Q-Former names (after "qformer.") -> Blip2QFormerModel's. Their `vision.*` keys are
# eva_vit_g.pth's names, mapped by `_EVA_NAMES`.
_OLD_QFORMER_NAMES = [
    ("embed_norm.", "layernorm."),
    ("layers.{i}.ffn.fc1.", "encoder.layer.{i}.intermediate_query.dense."),
    ("layers.{i}.ffn.fc2.", "encoder.layer.{i}.output_query.dense."),
    ("layers.{i}.ffn.norm.", "encoder.layer.{i}.output_query.LayerNorm."),
] + [
    (f"layers.{{i}}.{old}.{part}.", f"encoder.layer.{{i}}.{new}.{theirs}.")
    for old, new in (("self_attn", "attention"), ("cross_attn", "crossattention"))
    for part, theirs in (("query", "attention.query"), ("key", "attention.key"), ("value", "attention.value"),
                         ("out", "output.dense"), ("norm", "output.LayerNorm"))
]

KNOWN_LLM_SIZES = {4096: "a 7B LLaMA/Vicuna", 5120: "a 13B LLaMA/Vicuna", 6656: "a 33B LLaMA/Vicuna"}


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a `.pth` (zip or legacy pickle, tensors only) or `.safetensors` file into a dict.

    Raises CheckpointError, naming the file, for an empty file, an HTML page saved by a failed
    download, a truncated or corrupt archive, or anything that is not a checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download did not complete")
    with path.open("rb") as fh:
        head = fh.read(512)
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<")):
        raise CheckpointError(
            f"{path} is an HTML/XML page ({size} bytes), not a checkpoint: a failed download "
            "(e.g. a Google Drive confirmation or error page). Download the file again."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({size} bytes): {err}") from err
        check_finite(state, str(path))
        return state
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: no zip or pickle header ({size} bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers; refusing to unpickle it ({err})"
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    check_finite(obj, str(path))
    return obj


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object; unreadable, truncated or other JSON is a CheckpointError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 text ({err}): the file is corrupt") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is truncated or corrupt") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def check_finite(tree: Any, source: str, prefix: str = "") -> None:
    """Raise CheckpointError naming the first floating tensor in `tree` (nested dicts/lists) with a NaN or inf."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not tree.is_meta and not bool(torch.isfinite(tree).all()):
            kind = "NaN" if bool(torch.isnan(tree).any()) else "infinite"
            raise CheckpointError(
                f"{source}: tensor {prefix or '(top level)'} {tuple(tree.shape)} holds {kind} values; "
                "the file is corrupt or was saved from a diverged run"
            )
    elif isinstance(tree, dict):
        for key, value in tree.items():
            check_finite(value, source, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            check_finite(value, source, f"{prefix}[{index}]")


# --------------------------------------------------------------------------------------------
# Strict assignment
# --------------------------------------------------------------------------------------------


def name_list(keys: Iterable[str], limit: int = 12) -> str:
    """Sorted keys joined with ", ", the first `limit` of them when there are more."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def assign_strict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    expected: Iterable[str] | None = None,
    file_keys: dict[str, str] | None = None,
) -> None:
    """Load `state` into the submodules of `model` that its keys name, strictly.

    Every tensor of each named top-level submodule must be in `state`, with the right shape, and
    `state` may hold nothing else; `expected` additionally lists keys that must all be present.
    `file_keys` maps our key names back to the file's (those it lacks included), so errors name what the file
    calls them.
    The tensors are assigned (not copied), so a model built on the meta device loads in place.
    """
    file_keys = file_keys or {}
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        groups[head][rest] = tensor
    problems = []
    required = set(expected or [])
    unknown = [k for k in state if k.partition(".")[0] not in dict(model.named_children())]
    if unknown:
        problems.append(f"unexpected keys: {name_list(file_keys.get(k, k) for k in unknown)}")
    for head, sub in groups.items():
        not_tensors = [f"{head}.{k}" for k, v in sub.items() if not isinstance(v, torch.Tensor)]
        if not_tensors:
            problems.append(f"entries that are not tensors: {name_list(file_keys.get(k, k) for k in not_tensors)}")
            continue
        target = dict(model.named_children()).get(head)
        if target is None:
            continue
        own = target.state_dict()
        required |= {f"{head}.{k}" for k in own}
        extra = set(sub) - set(own)
        if extra:
            problems.append(f"unexpected keys: {name_list(file_keys.get(f'{head}.{k}', f'{head}.{k}') for k in extra)}")
        wrong = [
            f"{file_keys.get(f'{head}.{k}', f'{head}.{k}')} (file {tuple(sub[k].shape)}, model {tuple(own[k].shape)})"
            for k in sub.keys() & own.keys()
            if sub[k].shape != own[k].shape
        ]
        if wrong:
            problems.append(f"shape mismatches: {name_list(wrong)}")
        # Floating weights may come in any floating dtype (the model casts them); anything else must match.
        mistyped = [
            f"{file_keys.get(f'{head}.{k}', f'{head}.{k}')} (file {sub[k].dtype}, model {own[k].dtype})"
            for k in sub.keys() & own.keys()
            if (sub[k].dtype != own[k].dtype)
            and not (sub[k].dtype.is_floating_point and own[k].dtype.is_floating_point)
        ]
        if mistyped:
            problems.append(f"wrong dtypes: {name_list(mistyped)}")
    missing = required - set(state)
    if missing:
        problems.append(f"missing keys: {name_list(file_keys.get(k, k) for k in missing)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    for head, sub in groups.items():
        getattr(model, head).load_state_dict(sub, strict=True, assign=True)


def _split_ignored(
    state: dict[str, torch.Tensor], ignored: list[tuple[str, str]], source: str
) -> dict[str, torch.Tensor]:
    kept, skipped = {}, defaultdict(list)
    for key, tensor in state.items():
        reason = next((why for pattern, why in ignored if re.search(pattern, key)), None)
        if reason is None:
            kept[key] = tensor
        else:
            skipped[reason].append(key)
    for reason, keys in skipped.items():
        log.info("%s: skipping %d tensor(s), %s: %s", source, len(keys), reason, name_list(keys, 4))
    return kept


# --------------------------------------------------------------------------------------------
# The three original files
# --------------------------------------------------------------------------------------------


def _rename(key: str, names: list[tuple[str, str]], backwards: bool = False) -> str | None:
    """`key` renamed by the first template pair of `names` that matches it (right to left when `backwards`);
    None when none does."""
    for source, target in names:
        if backwards:
            source, target = target, source
        pattern = "^" + re.escape(source).replace(re.escape("{i}"), r"(\d+)") + ("" if source.endswith(".") else "$")
        if match := re.match(pattern, key):
            return (target.replace("{i}", match.group(1)) if match.groups() else target) + key[match.end():]
    return None


def eva_to_vision(
    state: dict[str, torch.Tensor], file_prefix: str, num_patches: int, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """EVA tensors under their original names (after `file_prefix`) -> `vision.*` (Blip2VisionModel's names),
    and each new name -> the file's, for error messages.

    `pos_embed` is resized to `num_patches` (`interpolate_pos_embed`); each block's q and v biases become its
    `qkv.bias` with a zero key third. Keys no table knows keep their name under `vision.`, so the strict load
    names them as unexpected.
    """
    mapped, file_keys = {}, {}
    qv_bias: dict[int, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    for file_key, tensor in state.items():
        key = file_key.removeprefix(file_prefix)
        if match := EVA_QV_BIAS.match(key):
            qv_bias[int(match.group(1))][match.group(2)] = (file_key, tensor)
            continue
        if key == "pos_embed":
            tensor = interpolate_pos_embed(tensor, num_patches)
        ours = "vision." + (_rename(key, _EVA_NAMES) or key)
        mapped[ours], file_keys[ours] = tensor, file_key
    for block, biases in sorted(qv_bias.items()):
        if set(biases) != {"q", "v"}:
            lacking = "q" if "v" in biases else "v"
            raise CheckpointError(f"{source} does not fit the model: missing keys: "
                                  f"{file_prefix}blocks.{block}.attn.{lacking}_bias")
        (q_key, q_bias), (_, v_bias) = biases["q"], biases["v"]
        if not (isinstance(q_bias, torch.Tensor) and isinstance(v_bias, torch.Tensor)) or q_bias.shape != v_bias.shape:
            raise CheckpointError(f"{source}: {q_key} and its v_bias are not two tensors of one shape")
        ours = f"vision.encoder.layers.{block}.self_attn.qkv.bias"
        mapped[ours] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        file_keys[ours] = q_key.replace("q_bias", "q_bias/v_bias")
    return mapped, file_keys


def vision_to_eva(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The inverse of `eva_to_vision`: a tower's state dict (Blip2VisionModel's names, no `vision.` prefix) under
    eva_vit_g.pth's names, each `qkv.bias` split into EVA's q_bias and v_bias (its key third must be zero)."""
    out = {}
    for key, tensor in state.items():
        name = _rename(key, _EVA_NAMES, backwards=True)
        if name is None:
            raise CheckpointError(f"{source}: {key} has no eva_vit_g.pth name")
        if name.endswith(".q_bias and v_bias"):
            q_bias, k_bias, v_bias = tensor.chunk(3)
            if k_bias.any():
                raise CheckpointError(f"{source}: {key} has a nonzero key bias, which EVA-ViT-g has not")
            stem = name.removesuffix("q_bias and v_bias")
            out[stem + "q_bias"], out[stem + "v_bias"] = q_bias, v_bias
        else:
            out[name] = tensor
    return out


def eva_vit_state_dict(
    state: dict[str, torch.Tensor], depth: int, num_patches: int, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map `eva_vit_g.pth` keys to `vision.*`, dropping the last stored block on purpose.

    EVA-CLIP-g stores 40 blocks; MiniGPT-4 (after BLIP-2) builds 39, so the output is the
    second-to-last layer of the original network. Block indices must be contiguous.
    """
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"{source}: block indices are not contiguous from 0: {blocks}")
    if len(blocks) not in (depth, depth + 1):
        raise CheckpointError(
            f"{source} stores {len(blocks)} ViT blocks; vision.depth={depth} needs {depth + 1} "
            f"(the last one is dropped on purpose) or exactly {depth}"
        )
    if len(blocks) == depth + 1:
        log.info("%s: block %d is not used (MiniGPT-4 builds %d blocks on purpose)", source, depth, depth)
    kept = {k: v for k, v in state.items() if not k.startswith(f"blocks.{depth}.")}  # the 40th block: not built
    return eva_to_vision(kept, "", num_patches, source)


def load_eva_vit(model: nn.Module, path: str | Path) -> None:
    """Load `eva_vit_g.pth` (a plain state dict without prefix) into `model.vision`."""
    state = read_checkpoint(path)
    if "model" in state and isinstance(state["model"], dict):
        raise CheckpointError(
            f"{path} is a wrapped training checkpoint (it has a 'model' entry), not the plain eva_vit_g.pth state dict"
        )
    cfg = model.config.vision
    if cfg.arch != "eva_vit_g":
        raise CheckpointError(f"{path}: eva_vit_g.pth needs vision.arch=eva_vit_g, the config has {cfg.arch!r}")
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    mapped, file_keys = eva_vit_state_dict(state, cfg.depth, num_patches, str(path))
    vision_keys = {f"vision.{k}" for k in model.vision.state_dict()}
    assign_strict(model, mapped, source=str(path), expected=vision_keys, file_keys=file_names(vision_keys) | file_keys)


def file_names(ours: Iterable[str]) -> dict[str, str]:
    """Our tower keys -> what the original files call them (`vision.*` as eva_vit_g.pth, the rest as the LAVIS
    BLIP-2 file), for naming the tensors a file lacks."""
    names = {}
    for key in ours:
        head, _, rest = key.partition(".")
        if head == "vision":
            names[key] = _rename(rest, _EVA_NAMES, backwards=True) or rest
        elif key == "qformer.query_tokens":
            names[key] = "query_tokens"
        elif head == "qformer":
            names[key] = "Qformer.bert." + (_rename(rest, _QFORMER_NAMES, backwards=True) or rest)
    return names


def qformer_key(key: str) -> str:
    """`qformer.` + a Q-Former key (original names after "Qformer.bert.") in Blip2QFormerModel's names."""
    return "qformer." + (_rename(key, _QFORMER_NAMES) or key)


def upgrade_qformer_key(key: str) -> str:
    """A key of ours from before the towers were transformers' (`qformer.embed_norm.weight`, ...) in today's names
    (`qformer.layernorm.weight`, ...); any other key comes back unchanged."""
    if key.startswith("qformer.") and (new := _rename(key.removeprefix("qformer."), _OLD_QFORMER_NAMES)):
        return "qformer." + new
    return key


def load_blip2(model: nn.Module, path: str | Path) -> None:
    """Load `blip2_pretrained_flant5xxl.pth` ({"model": {...}}) into ln_vision and the Q-Former.

    If the file also carries `visual_encoder.*`, those replace the ViT weights (as loading it
    after eva_vit_g.pth does in the original); they must then cover the whole tower.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' entry: not a LAVIS BLIP-2 checkpoint")
    kept = _split_ignored(ckpt["model"], BLIP2_IGNORED, str(path))
    mapped, file_keys = {}, {}
    for key, tensor in kept.items():
        if key.startswith("visual_encoder."):
            continue
        ours = ("qformer.query_tokens" if key == "query_tokens" else
                qformer_key(key.removeprefix("Qformer.bert.")) if key.startswith("Qformer.bert.") else
                key)  # ln_vision.* keeps its name; anything else is reported as unexpected
        mapped[ours], file_keys[ours] = tensor, key
    vision = {k: v for k, v in kept.items() if k.startswith("visual_encoder.")}
    if vision:
        log.info("%s carries visual_encoder.* (%d tensors): they replace the ViT weights", path, len(vision))
        cfg = model.config.vision
        vision, vision_files = eva_to_vision(vision, "visual_encoder.", (cfg.image_size // cfg.patch_size) ** 2,
                                             str(path))
        mapped.update(vision)
        file_keys.update(vision_files)
    required = {f"ln_vision.{k}" for k in model.ln_vision.state_dict()} | {
        f"qformer.{k}" for k in model.qformer.state_dict()
    }
    known = file_names(required) | {k: f"visual_encoder.{name}" for k, name in file_names(
        f"vision.{k}" for k in model.vision.state_dict()).items()}
    assign_strict(model, mapped, source=str(path), expected=required, file_keys=known | file_keys)


def upgrade_tower_keys(state: dict[str, torch.Tensor], num_patches: int, source: str) -> dict[str, torch.Tensor]:
    """Tower tensors saved before the towers were transformers' (format_version 1 folders, training checkpoints of
    a trainable Q-Former), renamed to today's names; keys already in today's names pass unchanged.

    The former `vision.*` names are eva_vit_g.pth's, the former `qformer.*` names `_OLD_QFORMER_NAMES`' left sides.
    """
    old_vision = {k: v for k, v in state.items()
                  if k.startswith("vision.") and (EVA_QV_BIAS.match(k.removeprefix("vision."))
                                                  or _rename(k.removeprefix("vision."), _EVA_NAMES))}
    upgraded = {upgrade_qformer_key(k): v for k, v in state.items() if k not in old_vision}
    if old_vision:
        upgraded.update(eva_to_vision(old_vision, "vision.", num_patches, source)[0])
    return upgraded


def projection_state_dict(ckpt: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{source} has no 'model' entry: not a MiniGPT-4 checkpoint")
    state = _split_ignored(ckpt["model"], PROJECTION_IGNORED, source)
    if not all(isinstance(state.get(k), torch.Tensor) for k in ("llama_proj.weight", "llama_proj.bias")):
        raise CheckpointError(
            f"{source} has no llama_proj.weight/llama_proj.bias: not a MiniGPT-4 projection checkpoint "
            f"(its 'model' entry holds {name_list(state, 6) or 'nothing'})"
        )
    # A training checkpoint of a trainable Q-Former also holds `qformer.*` (in older ones, our former names).
    return {("proj." + k.removeprefix("llama_proj.")) if k.startswith("llama_proj.") else upgrade_qformer_key(k): v
            for k, v in state.items()}


def _connector_name(model: nn.Module, width: int) -> str:
    """Which connector gives image features of `width` with this model's vision and Q-Former sizes."""
    names = {model.config.connector_width(c): c for c in ("qformer", "merge4")}
    return f"the {names[width]} connector's" if width in names else "another model's"


def load_projection(model: nn.Module, path: str | Path) -> None:
    """Load `llama_proj.*` from a MiniGPT-4 checkpoint (release file or training checkpoint).

    A training checkpoint also records how to talk to the model it trained; that becomes the
    model's `chat_defaults`.
    """
    ckpt = read_checkpoint(path)
    mapped = projection_state_dict(ckpt, str(path))
    file_width = mapped["proj.weight"].shape[0]
    llm_width = model.proj.weight.shape[0]
    if file_width != llm_width:
        raise CheckpointError(
            f"{path} holds a projection for an LLM of hidden size {file_width} "
            f"({KNOWN_LLM_SIZES.get(file_width, 'another model')}), but the loaded LLM has hidden size "
            f"{llm_width} ({KNOWN_LLM_SIZES.get(llm_width, 'another model')}). Use the checkpoint made for "
            "this LLM: prerained_minigpt4_7b.pth goes with Vicuna-7B, pretrained_minigpt4.pth with Vicuna-13B."
        )
    file_inputs, model_inputs = mapped["proj.weight"].shape[1], model.proj.weight.shape[1]
    if file_inputs != model_inputs:
        raise CheckpointError(
            f"{path} holds a projection of {file_inputs}-wide image features ({_connector_name(model, file_inputs)}), "
            f"but model.connector={model.config.connector} gives {model_inputs}-wide ones. Use the preset made for "
            "this file: pretrained_minigpt4_llama2_7b.pth goes with minigpt4-llama2-7b (connector merge4), the "
            "Vicuna v0 files with minigpt4-7b/minigpt4-13b (connector qformer)."
        )
    assign_strict(model, mapped, source=str(path), expected={"proj.weight", "proj.bias"})
    if "chat" in ckpt:
        model.chat_defaults = ChatDefaults.from_record(ckpt["chat"], str(path))
