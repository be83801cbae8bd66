"""Where the time of one training step goes: torch.profiler over a benchmark variant's step.

    python -m benchmarks.profile_step                                   # tiny dims, ours, stage 2 (seconds)
    python -m benchmarks.profile_step --dims original --threads 1 --label after   # full ViT-g + SmolLM2, CPU

Builds the variant exactly as `benchmarks.run` does (same weights, batch and step), runs one untimed
step, then profiles `--steps` steps and prints the operators by self time, split into matmul-class
kernels (matmuls, attention, convolutions: the FLOPs) and everything else (the overhead to remove).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.run import RESULTS_DIR, lscpu_model
from benchmarks.spec import TRAIN_VARIANTS, Spec
from benchmarks.worker import build, train_setup

# Operators whose self time is the arithmetic itself (BLAS/oneDNN kernels).
MATMUL_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::dot", "aten::mv",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::thnn_conv2d",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", choices=["tiny", "original"], default="tiny")
    parser.add_argument("--llm", default=None, help="tiny | smollm2 | a folder (default: tiny / smollm2 at original)")
    parser.add_argument("--layout", choices=["stage1", "stage2"], default="stage2")
    parser.add_argument("--variant", default="ours", choices=list(TRAIN_VARIANTS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (after one untimed step)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the random towers here between runs (default: a temporary folder)")
    parser.add_argument("--label", default="now", help="names the output: profile-<layout>-<dims>-<label>.{md,json}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    llm = args.llm or ("smollm2" if args.dims == "original" else "tiny")
    with tempfile.TemporaryDirectory(prefix="minigpt4-profile-") as tmp:
        workdir = str(args.workdir or tmp)
        spec = Spec(args.variant, "train", layout=args.layout, dims=args.dims, llm=llm, batch=args.batch,
                    steps=args.steps, threads=args.threads, workdir=workdir, switches=TRAIN_VARIANTS[args.variant])
        model = build(spec)
        setup = train_setup(spec, model, Path(tmp))
        setup.step()  # untimed: lazy initialisation, allocator warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                setup.step()
        wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / args.steps
    rows = sorted(({"op": e.key, "self_s": e.self_cpu_time_total / 1e6 / args.steps, "calls": e.count // args.steps,
                    "matmul": e.key in MATMUL_OPS} for e in events), key=lambda r: -r["self_s"])
    matmul = sum(r["self_s"] for r in rows if r["matmul"])
    other = [r for r in rows if not r["matmul"]]
    lines = [f"# Profile of one {args.layout} training step: {args.variant} "
             f"({TRAIN_VARIANTS[args.variant].describe()}), {args.dims} dims, LLM {llm}, batch {args.batch}", "",
             f"{lscpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{args.steps} profiled step(s) after 1 untimed; {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}.",
             "",
             f"Step wall time under the profiler {wall:.2f} s; operator self time {total:.2f} s, of which "
             f"matmul-class kernels {matmul:.2f} s ({100 * matmul / total:.0f}%) and the rest "
             f"{total - matmul:.2f} s ({100 * (total - matmul) / total:.0f}%); wall time outside any operator "
             f"(Python, the profiler's own bookkeeping) {max(wall - total, 0.0):.2f} s.", "",
             "Largest costs outside the matmuls: " + "; ".join(
                 f"{i + 1}. `{r['op']}` {r['self_s']:.2f} s ({100 * r['self_s'] / total:.1f}%, {r['calls']} calls)"
                 for i, r in enumerate(other[:3])) + ".", "",
             "| operator | self s / step | % of step | calls / step | matmul-class |", "|---|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['self_s']:.3f} | {100 * r['self_s'] / total:.1f}% | {r['calls']} | "
              f"{'yes' if r['matmul'] else ''} |" for r in rows[:args.top]]
    text = "\n".join(lines) + "\n"
    print(text)
    stem = RESULTS_DIR / f"profile-{args.layout}-{args.dims}-{args.label}"
    stem.with_suffix(".md").write_text(text)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall, "self_total_s": total,
              "matmul_s": matmul, "ops": rows[:60]}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"written: {stem}.md, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
