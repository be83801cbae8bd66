"""EVA-ViT-g + Q-Former before and after the towers became transformers' Blip2VisionModel / Blip2QFormerModel:
fidelity and image-encode speed at the full dims (39 blocks x 1408, 224 px, 32 queries), fp32, on the CPU.

    flock /work/wt/_notes/heavy.lock .venv/bin/python -m benchmarks.towers_before_after \\
        [--before 53a2206] [--runs 3] [--images 2] [--threads 2] [--output benchmarks/results/towers-before-after.md]

"before" is the package at git revision `--before` (checked out by `git worktree add` into a temporary folder,
removed afterwards), "after" the package next to this script. Random weights are written once in the original
layout (`eva_vit_g.pth` with its 40th block, a LAVIS BLIP-2 `{"model": ...}` file with ln_vision, the Q-Former and
its queries); each side loads them through its own `MiniGPT4.from_original` (the convert path) in its own
subprocess, one after the other (4 GB each), encodes the same real photos, and reports min/median/max seconds of
`frozen_features` (tower, ln_vision, Q-Former) over `--runs` timed runs after one warm-up, the FLOPs of one call
(torch's FlopCounterMode, during the warm-up), the fp32 matmul peak measured in the same process before and after
the runs (benchmarks/peak.py, the best of both) and the MFU of the median run. The parent then prints the max
absolute difference of the two sides' Q-Former outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = "53a2206"  # main just before the towers became transformers' modules
FULL_DIMS = "EVA-ViT-g/14 (39 x 1408, 224 px) + ln_vision + Q-Former (32 queries, 12 layers)"


# ------------------------------------------------------------------------------------ weights (original layout)


def original_shapes(depth: int, width: int, mlp: int, patch: int, image: int, queries: int, hidden: int,
                    layers: int, intermediate: int, cross_freq: int) -> tuple[dict, dict]:
    """Key -> shape of `eva_vit_g.pth` (with the 40th block MiniGPT-4 drops) and of the LAVIS BLIP-2 file's parts
    MiniGPT-4 reads, written out from the original code's module names."""
    eva = {"cls_token": (1, 1, width), "pos_embed": (1, (image // patch) ** 2 + 1, width),
           "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,)}
    for i in range(depth + 1):
        b = f"blocks.{i}."
        eva |= {b + "norm1.weight": (width,), b + "norm1.bias": (width,), b + "attn.qkv.weight": (3 * width, width),
                b + "attn.q_bias": (width,), b + "attn.v_bias": (width,), b + "attn.proj.weight": (width, width),
                b + "attn.proj.bias": (width,), b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                b + "mlp.fc1.weight": (mlp, width), b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (width, mlp),
                b + "mlp.fc2.bias": (width,)}
    blip2 = {"ln_vision.weight": (width,), "ln_vision.bias": (width,), "query_tokens": (1, queries, hidden),
             "Qformer.bert.embeddings.LayerNorm.weight": (hidden,), "Qformer.bert.embeddings.LayerNorm.bias": (hidden,)}

    def attention(prefix: str, kv_width: int) -> dict:
        return {prefix + "self.query.weight": (hidden, hidden), prefix + "self.query.bias": (hidden,),
                prefix + "self.key.weight": (hidden, kv_width), prefix + "self.key.bias": (hidden,),
                prefix + "self.value.weight": (hidden, kv_width), prefix + "self.value.bias": (hidden,),
                prefix + "output.dense.weight": (hidden, hidden), prefix + "output.dense.bias": (hidden,),
                prefix + "output.LayerNorm.weight": (hidden,), prefix + "output.LayerNorm.bias": (hidden,)}

    for i in range(layers):
        b = f"Qformer.bert.encoder.layer.{i}."
        blip2 |= attention(b + "attention.", hidden)
        if i % cross_freq == 0:
            blip2 |= attention(b + "crossattention.", width)
        blip2 |= {b + "intermediate_query.dense.weight": (intermediate, hidden),
                  b + "intermediate_query.dense.bias": (intermediate,),
                  b + "output_query.dense.weight": (hidden, intermediate), b + "output_query.dense.bias": (hidden,),
                  b + "output_query.LayerNorm.weight": (hidden,), b + "output_query.LayerNorm.bias": (hidden,)}
    return eva, blip2


def draw(shapes: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors like trained ones: norm weights near 1, everything else N(0, 0.02)."""
    out = {}
    for key, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * 0.02
        if "norm" in key.lower() and key.endswith("weight"):
            tensor = 1.0 + 5 * tensor
        out[key] = tensor
    return out


def dims_config(dims: str, attn: str = "sdpa"):
    """The model config of `dims`: the release's (full) or the tests' tiny preset (a quick check of this script)."""
    from minigpt4.config import ModelConfig, model_preset

    config = ModelConfig() if dims == "full" else model_preset("tiny")
    config.attn_implementation = attn
    return config


def stage_weights(workdir: Path, images: int, dims: str) -> None:
    """Write the original-layout files, the tiny LLM both sides load (unused by encoding) and the photos."""
    from skimage import data

    from minigpt4.processing.image import eval_transform
    from minigpt4.testing import build_tiny_llm

    config = dims_config(dims)
    v, q = config.vision, config.qformer
    eva_shapes, blip2_shapes = original_shapes(v.depth, v.width, v.mlp_dim, v.patch_size, v.image_size,
                                               q.num_query_tokens, q.hidden_size, q.num_layers, q.intermediate_size,
                                               q.cross_attention_freq)
    generator = torch.Generator().manual_seed(0)
    torch.save(draw(eva_shapes, generator), workdir / "eva_vit_g.pth")
    torch.save({"model": draw(blip2_shapes, generator)}, workdir / "blip2.pth")
    build_tiny_llm(workdir / "tiny-llm")
    from PIL import Image

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    transform = eval_transform(v.image_size)
    pixels = torch.stack([transform(Image.fromarray(photos[i % len(photos)])) for i in range(images)])
    torch.save(pixels, workdir / "pixels.pt")


# ------------------------------------------------------------------------------------ one side


def stage_encode(workdir: Path, name: str, tree: Path, runs: int, attn: str, dims: str) -> dict:
    """Load the original files through `tree`'s package and time `frozen_features` on the photos."""
    import minigpt4
    from benchmarks.peak import clock, matmul_peak
    from benchmarks.worker import count_flops
    from minigpt4.model.minigpt4 import MiniGPT4

    package = Path(minigpt4.__file__).resolve()
    if not package.is_relative_to(tree.resolve()):
        raise SystemExit(f"{name}: imported minigpt4 from {package}, not from {tree}")
    peak_before = matmul_peak(torch.float32)
    config = dims_config(dims, attn)
    start = time.perf_counter()
    model = MiniGPT4.from_original(workdir / "eva_vit_g.pth", workdir / "blip2.pth", workdir / "tiny-llm",
                                   dtype=torch.float32, device="cpu", config=config)
    load_s = time.perf_counter() - start
    pixels = torch.load(workdir / "pixels.pt", weights_only=True)
    now = clock("cpu")  # the peak's clock: the wall clock, or the process's CPU time with one thread
    with torch.no_grad():
        features, flops = count_flops(lambda: model.frozen_features(pixels))  # the warm-up
        times = []
        for _ in range(runs):
            start = now()
            again = model.frozen_features(pixels)
            times.append(now() - start)
    if not torch.equal(features, again):
        raise SystemExit(f"{name}: two runs on the same images gave different features")
    peak = max(peak_before, matmul_peak(torch.float32))
    torch.save(features, workdir / f"{name}-features.pt")
    bases = "/".join(type(module).__mro__[1].__name__ for module in (model.vision, model.qformer))
    return {"name": name, "bases": bases, "load_s": load_s, "times": times, "flops": flops, "peak": peak,
            "threads": torch.get_num_threads(), "shape": list(features.shape)}


# ------------------------------------------------------------------------------------ parent


def run_side(workdir: Path, name: str, tree: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "benchmarks.towers_before_after", "--stage", "encode", "--workdir", str(workdir),
               "--name", name, "--tree", str(tree), "--runs", str(args.runs), "--threads", str(args.threads),
               "--attn", args.attn, "--dims", args.dims]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], diff: float, args: argparse.Namespace, images: int) -> str:
    lines = ["| side | tower base classes | load s | encode s min / median / max | GFLOP per call | fp32 peak GFLOP/s "
             "| MFU (median) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        low, mid, high = min(r["times"]), statistics.median(r["times"]), max(r["times"])
        lines.append(f"| {r['name']} | {r['bases']} | {r['load_s']:.1f} | {low:.2f} / {mid:.2f} / {high:.2f} | "
                     f"{r['flops'] / 1e9:.0f} | {r['peak'] / 1e9:.0f} | {r['flops'] / mid / r['peak']:.0%} |")
    before, after = results
    speed = statistics.median(before["times"]) / statistics.median(after["times"])
    return "\n".join([
        f"{FULL_DIMS if args.dims == 'full' else 'the tiny test dims'}, fp32, CPU, "
        f"{images} real photos per call, attn_implementation={args.attn}, {after['threads']} threads, "
        f"{args.runs} timed runs after one warm-up; before = {args.before}, after = this tree.",
        "",
        *lines,
        "",
        f"max |after - before| of the Q-Former outputs {tuple(after['shape'])}: {diff:.3e}",
        f"median speed after / before: {speed:.2f}x",
    ])


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' package")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=2, help="photos per frozen_features call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--dims", choices=["full", "tiny"], default="full", help="tiny: a quick check of the script")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--stage", choices=["all", "weights", "encode"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3 (min/median/max)")
    torch.set_num_threads(args.threads)
    if args.stage == "weights":
        stage_weights(args.workdir, args.images, args.dims)
        return
    if args.stage == "encode":
        print(json.dumps(stage_encode(args.workdir, args.name, args.tree, args.runs, args.attn, args.dims)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="towers-before-after-"))
    before_tree = workdir / "before"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before_tree), args.before],
                       check=True)
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
        subprocess.run([sys.executable, "-m", "benchmarks.towers_before_after", "--stage", "weights", "--workdir",
                        str(workdir), "--images", str(args.images), "--dims", args.dims], env=env, cwd=ROOT,
                       check=True)
        results = [run_side(workdir, "before", before_tree, args), run_side(workdir, "after", ROOT, args)]
        before = torch.load(workdir / "before-features.pt", weights_only=True)
        after = torch.load(workdir / "after-features.pt", weights_only=True)
        diff = float((after - before).abs().max())
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    report = table(results, diff, args, args.images) + f"\nMachine: {machine}."
    print(report)
    if args.output:
        command = "python -m benchmarks.towers_before_after " + " ".join(sys.argv[1:])
        args.output.write_text(f"# Towers before / after transformers' BLIP-2 modules\n\n`{command}`\n\n```\n"
                               f"{report}\n```\n")


if __name__ == "__main__":
    main()
