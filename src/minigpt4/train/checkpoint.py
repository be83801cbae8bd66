"""Training checkpoints that never lose work: atomic writes, the newest K kept, exact resume.

A checkpoint is one `torch.save` dict:

    model      trainable weights; the projection as `llama_proj.weight/bias` (the original's names, so
               `minigpt4.convert.load_projection` and the original code read it), plus `qformer.*`
               when the Q-Former is trained
    optimizer  AdamW state;  scaler  GradScaler state or None
    step       optimizer steps done;  epoch  step // iters_per_epoch
    data       {"batches": micro-batches each process has consumed, "positions": {reader: stream items it
               consumed}} (loaders fast-forward there)
    rng        one entry per rank: python, numpy and torch (CPU and accelerator) generator states
    skipped    bad samples skipped so far;  config  the job config as a dict
    chat       how to talk to the trained model: the stage's layout as a conversation template, its
               system text, and decoding defaults (`ChatDefaults.record`; see `chat_record`)

Only tensors and plain containers are stored, so loading works with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minigpt4.chat.defaults import RELEASE, ChatDefaults
from minigpt4.convert import CheckpointError, read_checkpoint, upgrade_qformer_key
from minigpt4.processing.prompt import LLAMA2_TEMPLATE, VICUNA_V0_TEMPLATE

if TYPE_CHECKING:
    from minigpt4.config import TrainJobConfig
    from minigpt4.model.minigpt4 import MiniGPT4

log = logging.getLogger(__name__)

FORMAT = "minigpt4-train-1"
_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint_{step:08d}.pth"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints in `output_dir`, oldest step first (temporary files are ignored)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, file size limit, permissions); nothing older was touched."""


def _write_failure(err: BaseException) -> OSError | None:
    """The OS error behind a failed write: torch.save reports one raised by the file as a RuntimeError."""
    for candidate in (err, err.__cause__, err.__context__):
        if isinstance(candidate, OSError):
            return candidate
    return None


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` through a temporary file and a rename.

    A crash mid-write leaves at most a `*.tmp` file; `path` is either the old complete file or the
    new complete file, never a torn one. A write that fails (a full disk: ENOSPC) removes the temporary
    file and raises CheckpointSaveError in one line; earlier checkpoints are untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        failure = _write_failure(err)
        if failure is None:
            raise
        error = CheckpointSaveError(
            f"could not write checkpoint {path}: {failure.strerror or failure}; free space in {path.parent} (or "
            "point train.output_dir at another disk) and resume with train.resume=auto from the previous "
            "checkpoint, which is intact")
        error.errno = failure.errno
        raise error from err
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; returns what was deleted."""
    found = list_checkpoints(output_dir)
    doomed = found[: max(len(found) - keep_last, 0)] if keep_last > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# The entries resume reads, and the type each must have.
_ENTRIES: dict[str, tuple[type, ...]] = {
    "model": (dict,), "optimizer": (dict,), "scaler": (dict, type(None)), "step": (int,), "epoch": (int,),
    "data": (dict,), "rng": (list, tuple), "skipped": (int,), "config": (dict,),
}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by `save_atomic` (tensors and plain containers only).

    Every entry resume reads is checked for presence and type, so a damaged file is one
    CheckpointError naming the file and the entry, not a KeyError halfway through resuming.
    """
    state = read_checkpoint(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a minigpt4 training checkpoint (format {state.get('format')!r}, expected {FORMAT!r}). "
            "To start from released weights instead, set model.weights.projection to it."
        )
    for name, types in _ENTRIES.items():
        if name not in state:
            raise CheckpointError(f"{path} has no {name!r} entry: the checkpoint is incomplete")
        value = state[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, expected "
                                  + " or ".join(t.__name__ for t in types))
    not_tensors = sorted(str(k) for k, v in state["model"].items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: model entries {not_tensors[:8]} are not tensors")
    if state["step"] < 0 or not isinstance(state["data"].get("batches"), int):
        raise CheckpointError(f"{path}: step {state['step']!r} / data.batches {state['data'].get('batches')!r} "
                              "must be non-negative integers")
    for section in ("data", "train"):
        if not isinstance(state["config"].get(section), dict):
            raise CheckpointError(f"{path}: config.{section} is missing or not a mapping")
    for key in ("seed", "grad_accum"):
        if not isinstance(state["config"]["train"].get(key), int):
            raise CheckpointError(f"{path}: config.train.{key} is missing or not an integer")
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"{path}: the optimizer entry lacks its 'state' mapping or 'param_groups' list")
    return state


def chat_record(cfg: TrainJobConfig, model: MiniGPT4) -> dict[str, Any]:
    """The "chat" entry: the conversation template that lays prompts out as this stage trained them.

    Stage 1 (no prompts) trains `[image][caption]\n`: the `caption` template. Stage 2 (prompts, or
    conversations whose questions are wrapped in the template) with the
    released instruction template trains `###Human: ... ###Assistant: `: `vicuna_v0_train`; the Llama-2
    release's (`[INST] ... [/INST] `, end "</s>") chats in `llama2`, as that release does. The decoding is
    the model's own (the release's, or what the folder it was loaded from records).
    """
    conversations = any(d.kind == "conversations" for d in cfg.data.datasets)  # their questions are the prompts
    if not cfg.data.prompts and not conversations:
        template = "caption"
    elif cfg.data.prompt_template == VICUNA_V0_TEMPLATE and cfg.data.end_sym == "###":
        template = "vicuna_v0_train"
    elif cfg.data.prompt_template == LLAMA2_TEMPLATE and cfg.data.end_sym == "</s>":
        # The Llama-2 release trains `[INST] ... [/INST] ` answers ending in EOS and chats in its `llama2` format.
        return model.chat_defaults.replace(template="llama2").record()
    else:
        log.warning("data.prompt_template=%r with end_sym %r matches no conversation template: the checkpoint "
                    "records %r; pass --template when chatting with it", cfg.data.prompt_template, cfg.data.end_sym,
                    model.chat_defaults.template)
        return model.chat_defaults.record()
    return model.chat_defaults.replace(template=template, system="").record()


def chat_defaults(state: dict[str, Any], path: str | Path) -> ChatDefaults:
    """The chat defaults a loaded training checkpoint records (the release's for one written before they were)."""
    if "chat" not in state:
        return ChatDefaults(template_source=f"{RELEASE}; {path} records none")
    return ChatDefaults.from_record(state["chat"], str(path))


# --------------------------------------------------------------------------------------------
# Trainable weights
# --------------------------------------------------------------------------------------------


def trainable_state_dict(model: MiniGPT4) -> dict[str, torch.Tensor]:
    """The weights training changes, under the original's projection names."""
    state = {f"llama_proj.{k}": v.detach().cpu().clone() for k, v in model.proj.state_dict().items()}
    if model.config.qformer.trainable:
        state.update({f"qformer.{k}": v.detach().cpu().clone() for k, v in model.qformer.state_dict().items()})
    return state


def load_trainable_state_dict(model: MiniGPT4, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `trainable_state_dict` output back into `model`, strictly, keeping parameter identity."""
    proj = {k.removeprefix("llama_proj."): v for k, v in state.items() if k.startswith("llama_proj.")}
    # Checkpoints from before the Q-Former was transformers' hold its former names: read under today's.
    qformer = {upgrade_qformer_key(k).removeprefix("qformer."): v for k, v in state.items() if k.startswith("qformer.")}
    unknown = [k for k in state if not k.startswith(("llama_proj.", "qformer."))]
    if unknown:
        raise CheckpointError(f"{source}: unexpected trainable weights {unknown[:8]}")
    if model.config.qformer.trainable != bool(qformer):
        raise CheckpointError(
            f"{source} {'holds' if qformer else 'lacks'} Q-Former weights but model.qformer.trainable is "
            f"{model.config.qformer.trainable}: resume with the model config the checkpoint was trained with"
        )
    for name, module, sub in (("llama_proj", model.proj, proj), ("qformer", model.qformer, qformer)):
        own = module.state_dict() if module is not None else {}
        mistyped = [f"{name}.{k} ({v.dtype})" for k, v in sub.items()
                    if k in own and v.dtype.is_floating_point != own[k].dtype.is_floating_point]
        if mistyped:
            raise CheckpointError(f"{source}: wrong dtype for {', '.join(mistyped[:8])}: expected floating point")
    try:
        model.proj.load_state_dict(proj, strict=True)
        if qformer:
            model.qformer.load_state_dict(qformer, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit the model: {err}") from err


# --------------------------------------------------------------------------------------------
# Random generators
# --------------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states, as tensors and plain values (safe for weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if device.type != "cpu":
        module = getattr(torch, device.type)
        state["device"] = module.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu" and "device" in state:
        getattr(torch, device.type).set_rng_state(state["device"], device)
