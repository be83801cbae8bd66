"""encode_images and loss at the full original dims (39-block EVA-ViT-g, BERT-base Q-Former, random
weights) with a small LLM, on any device: wall time and peak memory.

    python -m benchmarks.full_dims [--llm PATH] [--batch 2] [--device cpu] [--dtype float32]

Without --llm a tiny random LLaMA is built in a temp folder.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from minigpt4.config import ModelConfig
from minigpt4.model.build import build_model
from minigpt4.processing.prompt import VICUNA_V0_TEMPLATE


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", help="a Hugging Face LLM folder (default: a tiny random LLaMA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(device=args.device, dtype=args.dtype)
    if args.llm:
        cfg.llm.path = args.llm
    else:
        from minigpt4.testing import build_tiny_llm

        cfg.llm.path = str(build_tiny_llm(tempfile.mkdtemp(prefix="tiny-llm-")))
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(cfg)
    build_s = time.perf_counter() - start
    towers = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("llm."))
    pixels = torch.randn(args.batch, 3, 224, 224, device=args.device)
    texts = ["a photograph of a small cat sleeping on a wooden bench in the sun"] * args.batch
    prompt = VICUNA_V0_TEMPLATE.format("<Img><ImageHere></Img> Describe this image in detail.")
    with torch.no_grad():
        start = time.perf_counter()
        embeds = model.encode_images(pixels)
        encode_s = time.perf_counter() - start
    start = time.perf_counter()
    loss = model.loss(pixels, texts, prompt=prompt, end_sym="###", max_txt_len=160)
    loss.backward()
    loss_s = time.perf_counter() - start
    print(f"device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"tower + Q-Former + projection parameters: {towers:,}; LLM: {cfg.llm.path}")
    print(f"build (random init): {build_s:.1f} s")
    print(f"encode_images -> {tuple(embeds.shape)}: {encode_s:.2f} s")
    print(f"loss + backward = {loss.item():.4f}: {loss_s:.2f} s")
    print(f"peak resident memory: {peak_rss_gib():.2f} GiB")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
