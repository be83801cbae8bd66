"""The embedded LLM (SmolLM2-135M-Instruct) in fp32 and in int8 (`model.llm.quantization=int8`, torchao weight-only)
on this machine's CPU: memory, prefill and decode speed, and how often int8's greedy tokens are fp32's.

    flock /work/wt/_notes/heavy.lock env PYTHONPATH=src OMP_NUM_THREADS=1 \\
        .venv/bin/python -m benchmarks.quantization [--runs 5] [--out benchmarks/results/quantization-cpu.md]

Each variant runs in a child process of its own, so its memory figures are its own: what loading adds to the
resident set (torch and minigpt4 already imported), anonymous and file-backed apart, and the process's peak. Speed
is timed in one more process holding both variants, their runs alternated with the fp32 matmul peak
(benchmarks/peak.py) measured before each round, so a busy shared machine slows both alike: batch 1, a
`--prefill`-token prompt (one forward, KV cache on), then `--decode` single-token steps on that cache;
min/median/max tokens/s over `--runs` rounds after a warm-up. Agreement, against the fp32 child's greedy answers:
`--prompts` chat prompts x `--new-tokens` greedy tokens (identical answers; the common prefix; teacher-forced
top-1, i.e. int8's argmax at each position of fp32's answer), then the embedded MiniGPT-4 (EfficientNet-Lite0 +
Q-Former + projection in front of the LLM) answering one captioning request per photo of `minigpt4 eval realphotos`
(random Q-Former and projection, the same in both children, unless `--checkpoint` names a trained folder such as
quickstart/model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

VARIANTS = ("none", "int8")  # model.llm.quantization values; "none" (fp32) is the reference
PROMPTS = [
    "Describe a red circle and a blue square on a white background.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three fruits that are yellow.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Give me a short tip for learning a new language.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "What does a camera lens do?",
    "Name two animals that live in the desert and say how they find water.",
    "Write a polite email line declining a meeting.",
    "What is 12 times 7, and how did you get it?",
    "Describe the picture of a cat sleeping on a windowsill in the sun.",
    "What should I pack for a day of hiking?",
    "Explain photosynthesis to a ten-year-old.",
    "What are the colours of a rainbow?",
    "Suggest a name for a small coffee shop.",
    "What is a good way to start a story about a lighthouse?",
]


def resident() -> dict[str, int]:
    """This process's resident memory now (Linux /proc), in bytes: anonymous (its own allocations) and file-backed
    (pages of files it maps, here the safetensors file, which the kernel may drop and re-read)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssFile")}


def release_freed_heap() -> None:
    """Hand the heap glibc keeps after frees back to the kernel (malloc_trim), to tell memory still used from memory
    merely retained: loading int8 frees each fp32 weight after quantising it, and glibc keeps those pages."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def chat_ids(tokenizer, prompt: str):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def child(args: argparse.Namespace) -> None:
    """Load the LLM in `args.child`'s form and write its measurements (and greedy answers) to `args.json`."""
    import torch

    from minigpt4.config import LLMConfig
    from minigpt4.embedded import prepare_smollm2
    from minigpt4.model.llm import load_llm, stored_bytes, unwrapped_tensors

    path = str(prepare_smollm2())
    before = resident()
    start = time.perf_counter()
    llm, tokenizer = load_llm(LLMConfig(path=path, quantization=args.child))
    load_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    loaded = resident()
    release_freed_heap()
    trimmed = resident()
    linear = {name: m.weight for name, m in llm.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not llm.get_output_embeddings()}
    result: dict = {
        "variant": args.child, "load_s": load_s, "peak_rss_bytes": peak,
        "anon_bytes": loaded["RssAnon"] - before["RssAnon"], "file_bytes": loaded["RssFile"] - before["RssFile"],
        "anon_trimmed_bytes": trimmed["RssAnon"] - before["RssAnon"],
        "weight_bytes": stored_bytes(llm),
        "linear_bytes": sum(t.numel() * t.element_size() for t in unwrapped_tensors(linear).values()),
    }

    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    answers, forced = [], []
    with torch.no_grad():
        for number, text in enumerate(PROMPTS[:args.prompts]):
            ids = chat_ids(tokenizer, text)
            new = llm.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)[0, ids.shape[1]:]
            answers.append(new.tolist())
            if reference is not None:  # int8's argmax at every position of fp32's answer
                expected = torch.tensor(reference["answers"][number])
                logits = llm(torch.cat([ids[0], expected])[None]).logits[0, ids.shape[1] - 1:-1]
                forced.append((logits.argmax(-1) == expected).tolist())
    result["answers"], result["forced"] = answers, forced
    result["photo_answers"] = photo_answers(args)
    Path(args.json).write_text(json.dumps(result))


def timing_child(args: argparse.Namespace) -> None:
    """Both variants in one process, their runs alternated with a matmul peak before each round, so the load other
    processes put on a shared machine falls on both alike; writes tokens/s per variant to `args.json`."""
    import torch

    from benchmarks.peak import matmul_peak
    from minigpt4.config import LLMConfig
    from minigpt4.embedded import prepare_smollm2
    from minigpt4.model.llm import load_llm

    path = str(prepare_smollm2())
    llms = {variant: load_llm(LLMConfig(path=path, quantization=variant))[0] for variant in VARIANTS}
    prompt = torch.randint(1000, 20000, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    speeds: dict[str, dict[str, list[float]]] = {v: {"prefill": [], "decode": []} for v in VARIANTS}
    peaks = []
    with torch.no_grad():
        for run in range(args.runs + 1):  # round 0 warms up
            peak = matmul_peak(torch.float32)
            for variant, llm in llms.items():
                start = time.perf_counter()
                out = llm(prompt, use_cache=True)
                prefill_s = time.perf_counter() - start
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(args.decode):
                    out = llm(token, cache=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                decode_s = time.perf_counter() - start
                if run:
                    speeds[variant]["prefill"].append(args.prefill / prefill_s)
                    speeds[variant]["decode"].append(args.decode / decode_s)
            if run:
                peaks.append(peak)
    result = {v: {"prefill_tps": spread(s["prefill"]), "decode_tps": spread(s["decode"]),
                  "decode_ratios": [d / f for d, f in zip(s["decode"], speeds["none"]["decode"])]}
              for v, s in speeds.items()}
    result["peak_flops"] = spread(peaks)
    Path(args.json).write_text(json.dumps(result))


def photo_answers(args: argparse.Namespace) -> list[list[int]]:
    """The embedded MiniGPT-4's greedy answer tokens to each photo's captioning request (`eval realphotos`)."""
    import torch
    from PIL import Image

    from minigpt4.chat import Chat
    from minigpt4.config import model_preset
    from minigpt4.embedded import prepare_smollm2
    from minigpt4.eval.tasks import read_real_photos
    from minigpt4.model.build import build_model
    from minigpt4.processing.image import eval_transform

    cfg = model_preset("embedded")
    cfg.llm.path = str(prepare_smollm2())
    cfg.llm.quantization = args.child
    if args.checkpoint:
        cfg.weights.pretrained = args.checkpoint
    torch.manual_seed(0)  # the same random Q-Former and projection in both children
    model = build_model(cfg)
    transform = eval_transform(model.config.vision.image_size)
    answers = []
    for sample in [s for s in read_real_photos() if s.id.endswith("/caption")][:args.photos]:
        chat = Chat(model, transform)
        chat.upload(Image.open(sample.image).convert("RGB"))
        chat.ask(sample.prompt)
        text = chat.answer(do_sample=False, max_new_tokens=args.new_tokens)
        answers.append(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return answers


def prefix_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(reference: list[list[int]], answers: list[list[int]]) -> str:
    identical = sum(a == b for a, b in zip(reference, answers))
    prefix = statistics.mean(prefix_length(a, b) / max(len(a), 1) for a, b in zip(reference, answers))
    return f"{identical}/{len(reference)} identical, mean common prefix {prefix:.1%} of fp32's answer"


def run_child(variant: str, args: argparse.Namespace, folder: Path, reference: Path | None) -> dict:
    out = folder / f"{variant}.json"
    command = [sys.executable, "-m", "benchmarks.quantization", "--child", variant, "--json", str(out),
               "--runs", str(args.runs), "--prefill", str(args.prefill), "--decode", str(args.decode),
               "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--photos", str(args.photos)]
    if reference is not None:
        command += ["--reference", str(reference)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    print(f"  {variant} ...", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def table(results: dict[str, dict], speeds: dict, args: argparse.Namespace, started: str) -> str:
    import torch
    import torchao

    fp32 = results["none"]
    mb = 1e6
    peak = speeds["peak_flops"]
    lines = [
        "# int8 weight-only LLM on the CPU: the embedded SmolLM2-135M-Instruct, fp32 vs int8",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, torchao {torchao.__version__}, "
        f"{torch.get_num_threads()} threads, batch 1. Started {started}.",
        "Command: `flock /work/wt/_notes/heavy.lock env PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python -m "
        f"benchmarks.quantization --runs {args.runs}`",
        "",
        f"Speed: min / median / max tokens/s over {args.runs} rounds in one process, fp32 and int8 alternated; "
        f"prefill = one {args.prefill}-token forward, decode = {args.decode} single-token steps on its KV cache. "
        f"fp32 matmul peak before each round: {peak['min'] / 1e9:.1f} / {peak['median'] / 1e9:.1f} / "
        f"{peak['max'] / 1e9:.1f} GFLOP/s.",
        "",
        "Memory added by loading (MB), each variant in a process of its own: anon = the process's own (then after "
        "malloc_trim hands back freed heap), file = pages of the safetensors file it mapped (fp32 computes from "
        "them; int8 read them once to quantise, so the kernel may drop them). Peak RSS includes torch and "
        "transformers.",
        "",
        "| LLM weights | stored MB | × fp32 | decoder Linear MB | × fp32 | anon | anon, trimmed | file | peak RSS "
        "| load s | prefill tok/s | decode tok/s | decode × fp32 (min / median / max of rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        p, d = speeds[variant]["prefill_tps"], speeds[variant]["decode_tps"]
        ratio = spread(speeds[variant]["decode_ratios"])
        lines.append(
            f"| {'fp32' if variant == 'none' else variant} | {r['weight_bytes'] / mb:.0f} | "
            f"{r['weight_bytes'] / fp32['weight_bytes']:.2f} | {r['linear_bytes'] / mb:.0f} | "
            f"{r['linear_bytes'] / fp32['linear_bytes']:.3f} | {r['anon_bytes'] / mb:.0f} | "
            f"{r['anon_trimmed_bytes'] / mb:.0f} | {r['file_bytes'] / mb:.0f} | "
            f"{r['peak_rss_bytes'] / mb:.0f} | {r['load_s']:.1f} | "
            f"{p['min']:.0f} / {p['median']:.0f} / {p['max']:.0f} | {d['min']:.1f} / {d['median']:.1f} / "
            f"{d['max']:.1f} | {ratio['min']:.2f} / {ratio['median']:.2f} / {ratio['max']:.2f} |")
    lines += ["", "Greedy agreement with fp32:", ""]
    for variant, r in results.items():
        if variant == "none":
            continue
        forced = [ok for row in r["forced"] for ok in row]
        prefixes = " ".join(f"{prefix_length(a, b)}/{len(a)}" for a, b in zip(fp32["answers"], r["answers"]))
        lines.append(f"- {variant}, {len(r['answers'])} chat prompts x {args.new_tokens} tokens: "
                     f"{agreement(fp32['answers'], r['answers'])}; teacher-forced top-1 agreement "
                     f"{sum(forced) / len(forced):.1%} of {len(forced)} positions. Common prefix per prompt: "
                     f"{prefixes}")
        towers = f"trained ({args.checkpoint})" if args.checkpoint else "random (seeded, the same in both)"
        lines.append(f"- {variant}, embedded MiniGPT-4 (Q-Former and projection {towers}), "
                     f"{len(r['photo_answers'])} realphotos captioning requests x up to {args.new_tokens} tokens: "
                     f"{agreement(fp32['photo_answers'], r['photo_answers'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--photos", type=int, default=14, help="realphotos captioning requests (14 = all)")
    parser.add_argument("--checkpoint", default="", help="a trained embedded folder (default: random towers)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--child", choices=(*VARIANTS, "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        timing_child(args) if args.child == "timing" else child(args)
        return
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with tempfile.TemporaryDirectory(prefix="quantization-") as tmp:
        folder = Path(tmp)
        results = {"none": run_child("none", args, folder, None)}
        for variant in VARIANTS[1:]:
            results[variant] = run_child(variant, args, folder, folder / "none.json")
        speeds = run_child("timing", args, folder, None)
    text = table(results, speeds, args, started)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
