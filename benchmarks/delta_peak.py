"""Peak memory of `apply-delta` (shard by shard) against loading base and delta whole and summing.

    PYTHONPATH=src .venv/bin/python -m benchmarks.delta_peak [--layers 12 --hidden 768 --shards 8]

Writes a random fp16 LLaMA-shaped base (vocab 32000, `.bin` shards) and delta (vocab 32001, the pad
row, `.safetensors` shards) to a temporary folder, then runs each way in its own subprocess and reads
that process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`): the baseline (torch imported),
`minigpt4.delta.apply_delta`, and the in-memory sum (`torch.load` + `load_file` of every shard, add,
one `save_file`), then checks both outputs are the same tensors. The driver itself imports no torch:
a child's ru_maxrss starts from its parent's RSS at fork, so a heavy parent would hide the children's peaks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def llama_shapes(layers: int, hidden: int, inter: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(folder: Path, shapes: dict[str, tuple[int, ...]], shards: int, fmt: str, vocab: int, seed: int) -> int:
    """Random fp16 tensors in `shards` files of format `fmt`, generated shard by shard; returns bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    keys = list(shapes)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        chunk = {k: (torch.randn(shapes[k], generator=gen) * 0.02).half() for k in keys[i * per:(i + 1) * per]}
        name = f"model-{i + 1:05d}-of-{shards:05d}{fmt}"
        torch.save(chunk, folder / name) if fmt == ".bin" else save_file(chunk, str(folder / name))
        weight_map.update(dict.fromkeys(chunk, name))
        total += sum(t.numel() * 2 for t in chunk.values())
    index = "pytorch_model.bin.index.json" if fmt == ".bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab}))
    return total


def _shard_files(folder: Path) -> list[Path]:
    index = next(folder.glob("*.index.json"))
    return [folder / name for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]


def _read_whole(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    state = {}
    for path in _shard_files(folder):
        state.update(load_file(str(path)) if path.suffix == ".safetensors"
                     else torch.load(path, map_location="cpu", weights_only=True))
    return state


def in_memory_sum(base: Path, delta: Path, output: Path) -> None:
    """The usual way: both models whole in memory, add, save."""
    from safetensors.torch import save_file

    base_state, delta_state = _read_whole(base), _read_whole(delta)
    for key, tensor in delta_state.items():
        if key in _VOCAB_TENSORS:
            tensor[: base_state[key].shape[0]] += base_state[key]
        else:
            tensor += base_state[key]
    output.mkdir()
    save_file(delta_state, str(output / "model.safetensors"))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(way: str, base: Path, delta: Path, output: Path) -> None:
    import safetensors.torch  # noqa: F401  (the baseline: what every way imports)
    import torch  # noqa: F401

    start = time.perf_counter()
    if way == "apply_delta":
        from minigpt4.delta import apply_delta

        apply_delta(base, delta, output)
    elif way == "in_memory_sum":
        in_memory_sum(base, delta, output)
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"way": way, "peak_rss_mib": round(_peak_mib(), 1), "seconds": seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--measure", nargs=4, metavar=("WAY", "BASE", "DELTA", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        way, *paths = args.measure
        if way == "write":
            size = write_model(Path(paths[0]), llama_shapes(args.layers, args.hidden, args.inter, 32000), args.shards,
                               ".bin", 32000, seed=0)
            write_model(Path(paths[1]), llama_shapes(args.layers, args.hidden, args.inter, 32001), args.shards,
                        ".safetensors", 32001, seed=1)
            print(size)
        elif way == "compare":
            print(_same(Path(paths[0]), Path(paths[1])))
        else:
            _measure(way, *map(Path, paths))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def child(*argv: str) -> str:
            extra = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--inter", str(args.inter),
                     "--shards", str(args.shards)]
            done = subprocess.run([sys.executable, "-m", "benchmarks.delta_peak", *extra, "--measure", *argv],
                                  capture_output=True, text=True, check=True)
            return done.stdout.strip().splitlines()[-1]

        size = int(child("write", str(root / "base"), str(root / "delta"), "-"))
        largest = max(p.stat().st_size for p in _shard_files(root / "base") + _shard_files(root / "delta"))
        print(f"model: {size / 2**20:.0f} MiB of fp16 per side, {args.shards} shards per side, "
              f"largest shard {largest / 2**20:.0f} MiB")
        results = {}
        for way in ("baseline", "apply_delta", "in_memory_sum"):
            results[way] = json.loads(child(way, str(root / "base"), str(root / "delta"), str(root / way)))
            print(f"{way:>14}: peak RSS {results[way]['peak_rss_mib']:7.1f} MiB  ({results[way]['seconds']} s)")
        base_mib = results["baseline"]["peak_rss_mib"]
        streamed = results["apply_delta"]["peak_rss_mib"] - base_mib
        whole = results["in_memory_sum"]["peak_rss_mib"] - base_mib
        tensor = 32001 * args.hidden * 2  # the largest tensor: the embedding (or LM head) with the delta's vocab
        print(f"above the baseline: apply_delta {streamed:.0f} MiB, in-memory sum {whole:.0f} MiB "
              f"({whole / max(streamed, 1):.1f}x); largest shard {largest / 2**20:.0f} MiB, "
              f"largest tensor {tensor / 2**20:.1f} MiB")
        same = child("compare", str(root / "apply_delta"), str(root / "in_memory_sum"), "-") == "True"
        print(f"outputs identical: {same}")
        return 0 if same else 1


def _same(streamed: Path, whole: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    merged = _read_whole(streamed)
    reference = load_file(str(whole / "model.safetensors"))
    return set(merged) == set(reference) and all(torch.equal(merged[k], reference[k]) for k in reference)


if __name__ == "__main__":
    sys.exit(main())
