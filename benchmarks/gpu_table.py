"""Training throughput in the published port's table format: NAME, TokensPerSec, Iterations, BatchSize, Torch_Version.

    benchmarks/gpu_table.sh                     # CUDA: Vicuna-7B dims (random weights), original vision dims
    benchmarks/gpu_table.sh --device cpu --dims tiny --llm tiny --steps 1 --batch-stage1 2 --batch-stage2 2  # dry run

Both stage layouts run for a fixed number of steps, each variant in its own process: "original" (the
original's own GPU settings: fp16 weights + fp16 autocast, eager attention, logits at every position),
"transformers" (transformers' Blip2ForConditionalGeneration from our export, bf16, SDPA) and "ours"
(model.dtype=auto -> bf16, SDPA, LM head at target positions, length buckets). tokens/s counts LLM
input positions (BOS, prompt, image positions, target; no padding) on one device.
The published port reports stage-1 pretrain 8866 tokens/s on 4 cards at batch 64 (so ~2216 per card)
and stage-2 finetune 2805 tokens/s on 1 card at batch 12 (Vicuna weights, 224 px).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.run import RESULTS_DIR, run_variant
from benchmarks.spec import TRAIN_VARIANTS, Spec

PUBLISHED = [  # (NAME, TokensPerSec, cards, BatchSize per card)
    ("minigpt4_stage1_pretrain (published, 4 cards)", 8866, 4, 64),
    ("minigpt4_stage2_finetune (published, 1 card)", 2805, 1, 12),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_table.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dims", choices=["tiny", "original"], default="original")
    parser.add_argument("--llm", default="vicuna7b", help="vicuna7b (random weights), tiny, smollm2 or a folder")
    parser.add_argument("--llm-layers", type=int, default=0, help="vicuna7b with fewer layers (dry runs); 0 = all 32")
    parser.add_argument("--variants", default="original,transformers,ours",
                        help=f"comma-separated, of {', '.join(TRAIN_VARIANTS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per stage")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-stage1", type=int, default=64)
    parser.add_argument("--batch-stage2", type=int, default=12)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON (default benchmarks/results/gpu_table-<device>.json)")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    for name in args.variants:
        if name not in TRAIN_VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(TRAIN_VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minigpt4-gpu-table-") as workdir:
        for layout, stage, batch in (("stage1", "minigpt4_stage1_pretrain", args.batch_stage1),
                                     ("stage2", "minigpt4_stage2_finetune", args.batch_stage2)):
            for variant in args.variants:
                spec = Spec(variant, "train", layout=layout, dims=args.dims, llm=args.llm, llm_layers=args.llm_layers,
                            device=args.device, batch=batch, steps=args.steps, warmup=args.warmup, workdir=workdir,
                            switches=TRAIN_VARIANTS[variant])
                print(f"running {stage} {variant}: {args.steps} iterations at batch {batch} on {args.device} ...",
                      file=sys.stderr, flush=True)
                result = run_variant(spec)
                rows.append({"NAME": f"{stage} ({variant}: {TRAIN_VARIANTS[variant].describe()})",
                             "TokensPerSec": result["tokens_per_s"], "Iterations": args.steps, "BatchSize": batch,
                             "Torch_Version": torch.__version__, "result": result})
    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    print(f"\nMiniGPT-4 training throughput on 1 x {device} ({args.dims} vision dims, LLM {args.llm}"
          f"{f' with {args.llm_layers} layers' if args.llm_layers else ''}, random weights; tokens/s at the median "
          f"of {args.steps} steps)\n")
    print("| NAME | TokensPerSec | Iterations | BatchSize | Torch_Version |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['NAME']} | {row['TokensPerSec']:.0f} | {row['Iterations']} | {row['BatchSize']} | "
              f"{row['Torch_Version']} |")
    for name, tokens, cards, batch in PUBLISHED:
        print(f"| {name} | {tokens} ({tokens / cards:.0f} per card) | - | {batch} | - |")
    output = args.output or RESULTS_DIR / f"gpu_table-{args.device.replace(':', '')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")
    print(f"\nJSON: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
