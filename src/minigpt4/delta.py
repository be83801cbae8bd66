"""Delta weights (how Vicuna v0 was released): target = base LLaMA + delta, one shard in memory at a time.

Inputs are Hugging Face model folders with `.safetensors` and/or `.bin` weights (an index file
mapping tensors to shards, or a single file; one index may mix both formats). Both are memory-mapped
(`safe_open`, `torch.load(mmap=True, weights_only=True)`) and released after every tensor, and each
output tensor is written as soon as it is computed, so the peak is a few of the largest tensor, not a
shard or a model. The output is safetensors shards of at most 1 GiB (`max_shard_bytes`) + index, with
the delta's config and tokenizer files.

The delta's vocabulary may be larger than the base's (Vicuna v0 adds a pad token: vocab_size 32001 in
its config, 32000 in LLaMA's). For tensors whose first dimension is a vocabulary (embeddings, LM head),
the rows the base has are summed and the delta's extra rows are taken as they are; the row count is the
one the delta's config states. transformers has no streaming delta tool, hence this module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")
# Copied from the delta (the target's vocabulary and settings are the delta's).
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json")


# Output shards hold at most this much (they are written one tensor at a time, so this does not bound memory).
DEFAULT_SHARD = 1 << 30


class DeltaError(ValueError):
    """Inputs that cannot be combined; the message names the folder or the tensor."""


@dataclass
class Weights:
    """The tensors of one model folder: name -> shard file, read shard by shard."""

    folder: Path
    shard_of: dict[str, str]
    vocab_size: int | None
    _open: dict[str, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> Weights:
        folder = Path(folder)
        if not folder.is_dir():
            raise DeltaError(f"{folder} is not a folder (expected a Hugging Face model folder)")
        shard_of: dict[str, str] | None = None
        for name in _INDEXES:
            if (folder / name).is_file():
                try:
                    shard_of = dict(json.loads((folder / name).read_text())["weight_map"])
                except (ValueError, KeyError, TypeError) as err:
                    raise DeltaError(f"{folder / name} is not a weight index ({err})") from None
                break
        if shard_of is None:
            single = next((name for name in _SINGLES if (folder / name).is_file()), None)
            if single is None:
                raise DeltaError(f"{folder} holds no {', '.join(_INDEXES + _SINGLES)}")
            shard_of = {key: single for key in _keys(folder / single)}
        for shard in set(shard_of.values()):
            if not (folder / shard).is_file():
                raise DeltaError(f"{folder / shard} is named in the index but missing")
        return cls(folder, shard_of, _vocab_size(folder))

    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.shard_of.values()))

    def get(self, key: str) -> torch.Tensor:
        shard = self.shard_of[key]
        if shard not in self._open:
            path = self.folder / shard
            if shard.endswith(".safetensors"):
                self._open[shard] = safe_open(str(path), framework="pt")
            else:
                self._open[shard] = _load_bin(path)
        handle = self._open[shard]
        return handle.get_tensor(key) if shard.endswith(".safetensors") else handle[key]

    def release(self) -> None:
        """Drop every open shard (and its mapped pages)."""
        self._open.clear()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # pickle, zip and unsafe-global errors all mean "not a weight file"
        raise DeltaError(f"{path} cannot be read as a torch weight file ({str(err).splitlines()[0]})") from None


def _keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    return list(_load_bin(path))


def _vocab_size(folder: Path) -> int | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("vocab_size")
    except ValueError as err:
        raise DeltaError(f"{config} is not valid JSON ({err})") from None


def _combine(key: str, base: torch.Tensor, other: torch.Tensor, op: Callable, vocab: tuple[int, int] | None,
             where: str) -> torch.Tensor:
    """`op(other, base)` on the rows both have; rows only `other` has (a larger vocabulary) are kept as they are."""
    if base.dtype != other.dtype:
        raise DeltaError(f"tensor {key}: dtype {other.dtype} in {where}, {base.dtype} in the base "
                         "(convert one of them first)")
    if base.shape == other.shape:
        return op(other, base)
    if (vocab is not None and base.shape[0] == vocab[0] and other.shape[0] == vocab[1]
            and base.shape[1:] == other.shape[1:]):
        out = other.clone()
        op(out[: vocab[0]], base, out=out[: vocab[0]])  # in place: no second vocabulary-sized temporary
        return out
    raise DeltaError(f"tensor {key}: shape {tuple(other.shape)} in {where}, {tuple(base.shape)} in the base "
                     "(only vocabulary rows, as the configs' vocab_size say, may differ)")


def _check_keys(base: Weights, other: Weights, what: str) -> None:
    only_other = sorted(set(other.shard_of) - set(base.shard_of))
    only_base = sorted(set(base.shard_of) - set(other.shard_of))
    if only_other or only_base:
        first = (f"tensor {only_other[0]} is in the {what} ({other.folder}) but not in the base" if only_other
                 else f"tensor {only_base[0]} is in the base ({base.folder}) but not in the {what}")
        count = len(only_other) + len(only_base)
        raise DeltaError(first + (f" ({count - 1} more differ)" if count > 1 else ""))


def _vocab(base: Weights, other: Weights) -> tuple[int, int] | None:
    if base.vocab_size and other.vocab_size and other.vocab_size > base.vocab_size:
        return base.vocab_size, other.vocab_size
    return None


def _combined(base: Weights, other: Weights, op: Callable, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, output tensor) for `keys`, one at a time.

    Both inputs are memory-mapped and released after every tensor: pages read stay resident while their
    mapping lives, so keeping a shard open would hold a whole input shard per side (re-opening is cheap).
    """
    vocab = _vocab(base, other)
    for key in keys:
        tensor = _combine(key, base.get(key), other.get(key), op, vocab, str(other.folder))
        base.release()
        other.release()
        yield key, tensor


def _plan(other: Weights, max_shard_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Output shards as lists of (name, dtype, shape), in `other`'s shard order, each at most
    `max_shard_bytes` (or one tensor). The output has `other`'s shapes, read without touching any data."""
    order = {shard: i for i, shard in enumerate(other.shards())}
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for key, _ in sorted(other.shard_of.items(), key=lambda item: order[item[1]]):
        tensor = other.get(key)
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, tensor.dtype, tuple(tensor.shape)))
        size += nbytes
        other.release()
    return shards


# safetensors' names for torch dtypes (the format's header spelling)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _write_shard(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Write a safetensors file whose header is known in advance, one tensor at a time; returns data bytes.

    `safetensors.torch.save_file` needs every tensor in memory at once; the format (8-byte header
    length, JSON header with byte offsets, raw little-endian data) lets the header go first instead.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in layout:
        if dtype not in _ST_DTYPES:
            raise DeltaError(f"tensor {key}: dtype {dtype} cannot be stored in safetensors")
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as fh:
        fh.write(len(encoded).to_bytes(8, "little"))
        fh.write(encoded)
        for key, dtype, shape in layout:
            name, tensor = next(tensors)
            if name != key or tensor.dtype != dtype or tuple(tensor.shape) != shape:  # a bug, not an input error
                raise AssertionError(f"{name} {tensor.dtype} {tuple(tensor.shape)} != planned {key} {dtype} {shape}")
            fh.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def _write(base: Weights, other: Weights, output: Path, op: Callable, side_from: Weights,
           max_shard_bytes: int) -> Path:
    _check_keys(base, other, "delta" if side_from is other else "target")
    if output.exists() and any(output.iterdir()):
        raise DeltaError(f"{output} is not empty; choose a new output folder")
    output.mkdir(parents=True, exist_ok=True)
    plan = _plan(other, max_shard_bytes)
    tensors = _combined(base, other, op, [key for layout in plan for key, _, _ in layout])
    weight_map, total = {}, 0
    for number, layout in enumerate(plan, start=1):
        name = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        part = output / (name + ".tmp")  # renamed when complete: a cut-short run leaves no valid-looking shard
        total += _write_shard(part, layout, tensors)
        os.replace(part, output / name)
        weight_map.update({key: name for key, _, _ in layout})
        log.info("wrote %s (%d tensors)", name, len(layout))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    for name in _SIDE_FILES:
        source = side_from.folder / name if (side_from.folder / name).is_file() else base.folder / name
        if source.is_file():
            shutil.copyfile(source, output / name)
    return output


def apply_delta(base: str | Path, delta: str | Path, output: str | Path, max_shard_bytes: int = DEFAULT_SHARD) -> Path:
    """Write base + delta to `output` (safetensors shards + index, the delta's config and tokenizer)."""
    delta_w = Weights.open(delta)
    return _write(Weights.open(base), delta_w, Path(output), torch.add, delta_w, max_shard_bytes)


def make_delta(base: str | Path, target: str | Path, output: str | Path, max_shard_bytes: int = DEFAULT_SHARD) -> Path:
    """Write target - base to `output`, so that `apply_delta(base, output)` gives the target back."""
    target_w = Weights.open(target)
    return _write(Weights.open(base), target_w, Path(output), torch.sub, target_w, max_shard_bytes)


def check_applied(base: str | Path, delta: str | Path, output: str | Path) -> int:
    """Re-read `output` and compare every tensor with base + delta, bit for bit; returns the tensor count."""
    base_w, delta_w, out_w = Weights.open(base), Weights.open(delta), Weights.open(output)
    _check_keys(base_w, out_w, "output")
    count = 0
    for key, expected in _combined(base_w, delta_w, torch.add, list(delta_w.shard_of)):
        written = out_w.get(key)
        if written.dtype != expected.dtype or written.shape != expected.shape or not torch.equal(written, expected):
            raise DeltaError(f"tensor {key} in {output} differs from base + delta; write the output again")
        out_w.release()
        count += 1
    return count
