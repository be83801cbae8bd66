"""MiniGPT-4 speed benchmark: ours against what a user would otherwise run, measured in the same invocation.

    python -m benchmarks.run                                   # tiny dims, a few seconds per variant
    python -m benchmarks.run --dims original --parts stage1 stage2 --threads 1   # 39-block ViT-g, SmolLM2, CPU

The reference of every ratio is "original": the original MiniGPT-4's own step on this device (its
precision: fp32 on a CPU, fp16 on a GPU; eager attention; logits at every position; towers run in
every step). "transformers" is transformers' own Blip2ForConditionalGeneration holding the same
weights (our `minigpt4 export --format transformers` folder), trained as one would with it (forward
with labels, backward into language_projection only). "ours" is `minigpt4 train`'s step with its
defaults (model.dtype=auto, SDPA, LM head at target positions) and train.length_buckets=4;
"ours+cache" the same from the frozen-feature cache. Each variant runs in its own process on the
same seeded weights and the same batch. Prints markdown tables and writes JSON.

Parts:
  stage1  training, stage-1 layout: [BOS][image][caption], 32-token captions (batch 64 in the original)
  stage2  training, stage-2 layout: instruction prompt + image + 160-token description (batch 12 originally)
  chat    time to first token (image encoding + prefill) and decode tokens/s through minigpt4.chat

Timing: --steps timed steps per variant after --warmup untimed ones; s/step and tokens/s are given as
median (min-max) over the timed steps. On a CPU with --threads 1, every time (steps, cache builds, the
matmul peak) is the process's CPU time, which a shared machine's other processes do not inflate; else
the wall clock. tokens/s = LLM input positions (BOS, prompt, image positions,
target; padding excluded) per second. MFU = matmul/attention FLOPs the step runs (counted by torch's
FlopCounterMode in the first warm-up step) per second at the median step, over this machine's matmul
peak in the variant's compute dtype: the best of the peaks measured at the start and end of the
invocation and inside each variant's process right before its timed steps. An MFU above 100% would
mean the peak was mis-measured and is flagged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peak import matmul_peak
from benchmarks.spec import CHAT_VARIANTS, TRAIN_VARIANTS, Spec
from benchmarks.worker import RESULT_PREFIX, execute

RESULTS_DIR = Path(__file__).parent / "results"
PARTS = ("stage1", "stage2", "chat")
REFERENCE = "original"  # every ratio is taken against this variant
DEFAULT_TRAIN = "original,transformers,ours,ours+cache"
DEFAULT_CHAT = "original,ours,ours-batch4"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--dims", choices=["tiny", "original"], default="tiny",
                        help="tower dims: tiny (tests) or original (EVA-ViT-g 39 blocks, BERT-base Q-Former)")
    parser.add_argument("--llm", default=None,
                        help="tiny | smollm2 | vicuna7b (random, Vicuna-7B dims) | a model folder "
                             "(default: tiny with --dims tiny, smollm2 on CPU / vicuna7b on CUDA with --dims original)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--variants", default=None,
                        help=f"training variants, comma-separated (default {DEFAULT_TRAIN}; also: "
                             f"{', '.join(v for v in TRAIN_VARIANTS if v not in DEFAULT_TRAIN.split(','))})")
    parser.add_argument("--stage1-variants", default=None, help="training variants for stage1 (default: --variants)")
    parser.add_argument("--chat-variants", default=DEFAULT_CHAT, help=f"chat variants (of {', '.join(CHAT_VARIANTS)})")
    parser.add_argument("--compile", action="store_true",
                        help="add the torch.compile variant (slow to compile on CPU)")
    parser.add_argument("--batch-stage1", type=int, default=None, help="stage-1 batch (default 8 tiny, 4 original)")
    parser.add_argument("--batch-stage2", type=int, default=None, help="stage-2 batch (default 4 tiny, 2 original)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (at least 3: min/median/max)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one counts FLOPs)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="chat: tokens per answer (default 32 tiny, 16 original)")
    parser.add_argument("--device", default="cpu", help="torch device string (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per variant (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the random towers (and the transformers export) here between invocations "
                             "(default: a temporary folder)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the variants in this process (quick smoke runs; peak memory is then not per variant)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file to write (default benchmarks/results/<dims>-<device>.json)")
    args = parser.parse_args(argv)
    original = args.dims == "original"
    cuda = args.device.startswith("cuda")
    if args.llm is None:
        args.llm = ("vicuna7b" if cuda else "smollm2") if original else "tiny"
    args.batch_stage1 = args.batch_stage1 or (4 if original else 8)
    args.batch_stage2 = args.batch_stage2 or (2 if original else 4)
    args.new_tokens = args.new_tokens or (16 if original else 32)
    train = (args.variants or DEFAULT_TRAIN).split(",")
    if args.compile:
        train += [v for v in ("ours+compile",) if v not in train]
    if args.compile and args.stage1_variants:
        args.stage1_variants += ",ours+compile"
    args.variants = {"stage2": train, "stage1": args.stage1_variants.split(",") if args.stage1_variants else train,
                     "chat": args.chat_variants.split(",")}
    for part, names in args.variants.items():
        known = CHAT_VARIANTS if part == "chat" else TRAIN_VARIANTS
        for name in names:
            if name not in known:
                parser.error(f"unknown {part} variant {name!r}; choose from {', '.join(known)}")
        if REFERENCE not in names:
            parser.error(f"{part} needs the {REFERENCE} variant: the ratios are taken against it")
        # The reference runs first: its fp32 towers are saved for the later variants to load.
        args.variants[part] = [REFERENCE] + [v for v in names if v != REFERENCE]
    if args.steps < 3:
        parser.error("--steps must be at least 3 (each figure is a min/median/max)")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first warm-up step counts FLOPs)")
    return args


def specs_for(args: argparse.Namespace, part: str, workdir: str) -> list[Spec]:
    common = dict(dims=args.dims, llm=args.llm, device=args.device, steps=args.steps, warmup=args.warmup,
                  seed=args.seed, threads=args.threads, workdir=workdir)
    if part == "chat":
        return [Spec(name, "chat", batch=1, new_tokens=args.new_tokens, switches=CHAT_VARIANTS[name], **common)
                for name in args.variants["chat"]]
    batch = args.batch_stage1 if part == "stage1" else args.batch_stage2
    return [Spec(name, "train", layout=part, batch=batch, switches=TRAIN_VARIANTS[name], **common)
            for name in args.variants[part]]


def run_variant(spec: Spec) -> dict:
    """Run one variant in a fresh Python process; its last stdout line holds the result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", spec.to_json()], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"variant {spec.name!r} ({spec.task} {spec.layout}) failed with exit code "
                           f"{proc.returncode}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = time.perf_counter() - start
    return result


def execute_here(spec: Spec) -> dict:
    start = time.perf_counter()
    result = execute(spec)
    result["wall_s"] = time.perf_counter() - start
    return result


def add_ratios(part: str, rows: list[dict], peaks: dict[str, float]) -> None:
    """Each row gets its figures relative to the part's reference row (measured in this invocation)."""
    base = next(r for r in rows if r["variant"] == REFERENCE)
    for row in rows:
        row["memory_ratio"] = row["peak_memory_gib"] / base["peak_memory_gib"]
        if part == "chat":
            row["ttft_ratio"] = row["ttft_s"] / base["ttft_s"]
            measured = row["decode_tok_s"] is not None and base["decode_tok_s"] is not None
            row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"] if measured else None
            continue
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["loss_rel_diff"] = abs(row["loss"] - base["loss"]) / abs(base["loss"])
        peak = max(peaks.get(row["compute_dtype"], 0.0), row.get("worker_peak_flops") or 0.0)
        row["peak_flops"] = peak
        row["mfu"] = row["flops_per_s"] / peak if row["flops_per_s"] and peak else None


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def spread(row: dict, key: str, spec: str) -> str:
    """median (min-max) of a timed figure."""
    return f"{row[key]:{spec}} ({row[key + '_min']:{spec}}-{row[key + '_max']:{spec}})"


def mfu_cell(row: dict) -> str:
    if not row["mfu"]:
        return "n/a"
    flag = " (!) over 100%: the peak was mis-measured" if row["mfu"] > 1 else ""
    return f"{100 * row['mfu']:.1f}% of {row['peak_flops'] / 1e9:.0f} GFLOP/s {row['compute_dtype']}{flag}"


def table(part: str, rows: list[dict]) -> str:
    if part == "chat":
        head = ("| variant | what runs | TTFT s | TTFT × original | decode tok/s | decode × original | "
                "peak mem GiB | mem × original |\n|---|---|---|---|---|---|---|---|")
        body = [f"| {r['variant']} | {r['switches']} | {fmt(r['ttft_s'])} | {fmt(r['ttft_ratio'])} | "
                f"{fmt(r['decode_tok_s'], '.1f')} | {fmt(r['decode_ratio'])} | {fmt(r['peak_memory_gib'])} | "
                f"{fmt(r['memory_ratio'])} |" for r in rows]
    else:
        head = ("| variant | what runs | tokens/s median (min-max) | × original | s/step median (min-max) | "
                "loss (1st step) | Δloss vs original | peak mem GiB | MFU (median step) |\n"
                "|---|---|---|---|---|---|---|---|---|")
        body = [f"| {r['variant']} | {r['switches']} | {spread(r, 'tokens_per_s', '.1f')} | {fmt(r['speedup'])} | "
                f"{spread(r, 'step_s', '.2f')} | {fmt(r['loss'], '.4f')} | "
                f"{fmt(100 * r['loss_rel_diff'], '.3f', '%')} | {fmt(r['peak_memory_gib'])} | {mfu_cell(r)} |"
                for r in rows]
    return "\n".join([head, *body])


def title(part: str, args: argparse.Namespace, rows: list[dict]) -> str:
    if part == "chat":
        return (f"Chat: vicuna_v0 prompt with 1 image, {args.new_tokens} greedy tokens per answer "
                f"(prompt {rows[0]['prompt_tokens']} positions)")
    batch = args.batch_stage1 if part == "stage1" else args.batch_stage2
    what = "32-token captions, no prompt" if part == "stage1" else "instruction prompt + descriptions up to 160 tokens"
    base = rows[0]
    timing = ("timed by the process's CPU time (one torch thread: the compute time, without the slices a shared "
              "machine's scheduler gives to other processes; wall times are in the JSON)" if base["clock"] == "cpu"
              else "timed by the wall clock")
    return (f"Training, {part} layout ({what}): batch {batch}, {base['tokens_per_step']} LLM input positions per "
            f"step ({base['padded_positions']} with padding); {args.steps} timed steps per variant, {timing}")


def measure_peaks(device: str, before: dict[str, float]) -> dict[str, float]:
    """fp32 and bf16 matmul peaks now, each the best of this measurement and `before`."""
    return {name: max(before.get(name, 0.0), matmul_peak(dtype, device))
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def lscpu_model() -> str:
    """The CPU's model name and whether it has native bf16 (e.g. "Intel Xeon ..., no avx512_bf16/amx_bf16")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{name} ({simd}, {'native bf16: ' + '/'.join(native) if native else 'no avx512_bf16/amx_bf16'})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    peaks = measure_peaks(args.device, {})
    cpu = lscpu_model() if not args.device.startswith("cuda") else ""
    machine = (f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if args.device.startswith("cuda"):
        machine += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    print(f"# MiniGPT-4 benchmark, {args.dims} dims, LLM {args.llm}\n")
    print(f"{machine}. Matmul peak at the start: fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s. Started {started}.\n", flush=True)
    report: dict = {"started": started, "machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items()}, "matmul_peak_flops": peaks, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="minigpt4-bench-") as tmp:
        workdir = str(args.workdir or tmp)
        for part in args.parts:
            rows = []
            for spec in specs_for(args, part, workdir):
                print(f"  {part}: {spec.name} ...", end="", flush=True, file=sys.stderr)
                result = execute_here(spec) if args.in_process else run_variant(spec)
                print(f" {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
                rows.append({"variant": spec.name, "switches": spec.switches.describe(),
                             "spec": dataclasses.asdict(spec), **result})
            report["parts"][part] = rows
    peaks = measure_peaks(args.device, peaks)  # the end: the best of both, as the machine is shared
    report["matmul_peak_flops"] = peaks
    print(f"Matmul peak, best of start and end: fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s.\n")
    for part, rows in report["parts"].items():
        add_ratios(part, rows, peaks)
        print(f"## {title(part, args, rows)}\n\n{table(part, rows)}\n", flush=True)
    output = args.output or RESULTS_DIR / f"{args.dims}-{args.device.replace(':', '')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"JSON: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
