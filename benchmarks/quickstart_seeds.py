"""The quickstart's reported numbers: `minigpt4 quickstart` once per seed, then min/median/max over the seeds.

    python -m benchmarks.quickstart_seeds                       # seeds 0 1 2, the full plan (~1 hour on 2 cores)
    python -m benchmarks.quickstart_seeds --seeds 0 --fast      # a smoke run of this script
    python -m benchmarks.quickstart_seeds --summarize-only      # re-print the table from the runs on disk

Each seed draws its own training, validation and test images and its own training order. The plan's settings
were chosen on the validation split; the README reports the test split. The machine's fp32 matmul peak is
measured before each run (the quickstart trains in fp32), so a slow run on a busy machine shows as such.
Writes OUTPUT/seeds.json and prints two markdown tables: the runs (time, losses, colour + shape score), and the
`minigpt4 eval` metrics of the test split and of the unseen colour-shape pairs (median, min and max over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.peak import matmul_peak

# (label, path into summary.json, format): the columns of the table, in order.
COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("total min", ("total_seconds",), "min"),
    ("features s", ("seconds", "features"), "{:.0f}"),
    ("stage 1 s", ("seconds", "stage1"), "{:.0f}"),
    ("stage 2 s", ("seconds", "stage2"), "{:.0f}"),
    ("stage 1 loss", ("stage1", "final_loss"), "{:.3f}"),
    ("stage 2 loss", ("stage2", "final_loss"), "{:.3f}"),
    ("stage 1 tokens/s", ("stage1", "tokens_per_s"), "{:.0f}"),
    ("stage 2 tokens/s", ("stage2", "tokens_per_s"), "{:.0f}"),
    ("val. stage 1 captions", ("validation_stage1_captions", "accuracy"), "pct"),
    ("val. final", ("validation", "accuracy"), "pct"),
    ("test colour+shape", ("test", "accuracy"), "pct"),
    ("test colour", ("test", "colour"), "share"),
    ("test shape", ("test", "shape"), "share"),
]


def machine() -> str:
    """CPU model, the bf16 instructions it has, cores and torch: enough to tell two machines apart."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["no native bf16"]
    return f"{model} ({', '.join(bf16)}), {os.cpu_count()} CPUs, torch {torch.__version__}"


def value(summary: dict, path: tuple[str, ...]) -> float:
    node = summary
    for key in path:
        node = node[key]
    return float(node)


def cell(summary: dict, path: tuple[str, ...], fmt: str) -> float:
    """The number a column shows (shares of the test images become percentages)."""
    number = value(summary, path)
    if fmt == "min":
        return number / 60
    if fmt == "pct":
        return 100 * number
    if fmt == "share":
        return 100 * number / summary["test"]["images"]
    return number


def render(number: float, fmt: str) -> str:
    if fmt in ("pct", "share"):
        return f"{number:.0f}%"
    if fmt == "min":
        return f"{number:.1f}"
    return fmt.format(number)


def table(runs: list[dict]) -> str:
    """One row per seed, then min / median / max over the seeds."""
    head = ["seed", "fp32 peak GFLOP/s"] + [label for label, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [str(run["seed"]), f"{run['fp32_peak'] / 1e9:.0f}"]
        cells += [render(cell(run["summary"], path, fmt), fmt) for _, path, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    for name, reduce in (("min", min), ("median", statistics.median), ("max", max)):
        cells = [f"**{name}**", f"{reduce(r['fp32_peak'] for r in runs) / 1e9:.0f}"]
        for _, path, fmt in COLUMNS:
            cells.append(render(reduce(cell(r["summary"], path, fmt) for r in runs), fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (label, task, metric) rows of the `minigpt4 eval` table; the quickstart's summary.json holds
# eval[split][task][metric]. Shares are shown as percentages, caption scores as they are.
EVAL_ROWS: list[tuple[str, str, str]] = [
    ("CIDEr", "caption", "CIDEr"), ("BLEU-4", "caption", "Bleu_4"), ("METEOR", "caption", "METEOR"),
    ("ROUGE-L", "caption", "ROUGE_L"), ("VQA accuracy", "vqav2", "accuracy"),
] + [(f"POPE {setting} {label}", f"pope_{setting}", metric) for setting in ("random", "popular", "adversarial")
     for label, metric in (("accuracy", "accuracy"), ("F1", "f1"), ("yes-ratio", "yes_ratio"))]
EVAL_SPLITS = (("test", "test (seen pairs)"), ("test_unseen", "unseen pairs"))


def eval_table(runs: list[dict]) -> str:
    """The `minigpt4 eval` metrics: one row per metric; per split the median over the seeds and its min-max."""
    head = ["metric"] + [f"{label} {what}" for _, label in EVAL_SPLITS for what in ("median", "min-max")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, task, metric in EVAL_ROWS:
        cells = [label]
        for split, _ in EVAL_SPLITS:
            values = [r["summary"]["eval"][split][task][metric] for r in runs]
            show = (lambda v: f"{v:.3f}") if task == "caption" else (lambda v: f"{100 * v:.1f}%")
            cells += [show(statistics.median(values)), f"{show(min(values))}-{show(max(values))}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_seed(seed: int, out: Path, threads: int, fast: bool, peak: float, log: Path | None) -> dict:
    """Run the quickstart for one seed in its own process (console to `log` if given); its summary.json."""
    command = [sys.executable, "-m", "minigpt4.cli", "quickstart", "--seed", str(seed), "--output", str(out),
               "--threads", str(threads)] + (["--fast"] if fast else [])
    print(f"$ {' '.join(command[1:])}" + (f"  > {log}" if log else ""), flush=True)
    started = time.perf_counter()
    if log is None:
        subprocess.run(command, check=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as console:
            subprocess.run(command, check=True, stdout=console, stderr=subprocess.STDOUT)
    return {"seed": seed, "fp32_peak": peak, "wall_seconds": time.perf_counter() - started,
            "summary": json.loads((out / "summary.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("runs/quickstart-seeds"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="the quickstart's --fast plan (a smoke run)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at once (each with --threads; consoles go to OUTPUT/seed-N/console.log)")
    parser.add_argument("--summarize-only", action="store_true", help="only read OUTPUT/seeds.json and print")
    args = parser.parse_args(argv)
    record = args.output / "seeds.json"
    if args.summarize_only:
        report = json.loads(record.read_text())
    else:
        args.output.mkdir(parents=True, exist_ok=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # The peak before each seed when they run one after another; with --jobs > 1, once before they all start.
        runs: list[dict] = []
        if args.jobs == 1:
            for seed in args.seeds:
                runs.append(run_seed(seed, args.output / f"seed-{seed}", args.threads, args.fast,
                                     matmul_peak(torch.float32), None))
        else:
            peak = matmul_peak(torch.float32)
            with ThreadPoolExecutor(args.jobs) as pool:
                runs = list(pool.map(lambda seed: run_seed(
                    seed, args.output / f"seed-{seed}", args.threads, args.fast, peak,
                    args.output / f"seed-{seed}" / "console.log"), args.seeds))
        report = {"started": started, "machine": machine(), "threads": args.threads, "jobs": args.jobs,
                  "fast": args.fast, "fp32_peak_after": matmul_peak(torch.float32), "runs": runs}
        record.write_text(json.dumps(report, indent=1))
    plan = "--fast plan" if report["fast"] else "full plan"
    print(f"\nminigpt4 quickstart, {plan}, {len(report['runs'])} seed(s), {report['jobs']} at a time with "
          f"{report['threads']} thread(s) each; machine: {report['machine']}; started {report['started']}; "
          f"fp32 matmul peak after the runs: {report['fp32_peak_after'] / 1e9:.0f} GFLOP/s")
    print(table(report["runs"]))
    if all("eval" in run["summary"] for run in report["runs"]):
        print(f"\n`minigpt4 eval` of the quickstart model (greedy, the tasks' default prompts), {len(report['runs'])} "
              "seed(s): the test split (colour-shape pairs seen in training) and the unseen pairs")
        print(eval_table(report["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
