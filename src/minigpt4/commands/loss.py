"""`minigpt4 loss`: build a model from a config and print its loss on one image and caption."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minigpt4.config import model_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset: tiny, minigpt4-7b, minigpt4-13b")
    parser.add_argument("--config", type=Path, help="a model YAML file (overrides the preset)")
    parser.add_argument("--image", type=Path, help="an image file (default: a CC0 photo from scikit-image)")
    parser.add_argument("--text", default="a cat lying on a blanket", help="the caption to score")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. llm.path=/models/vicuna-7b")


def run(args: argparse.Namespace) -> int:
    from minigpt4.model.build import build_model
    from minigpt4.processing.image import eval_transform, load_image

    cfg = model_config(args.preset, args.config, args.overrides)
    if not cfg.llm.path and args.preset == "tiny":
        from minigpt4.testing import build_tiny_llm

        cfg.llm.path = str(build_tiny_llm(Path.home() / ".cache" / "minigpt4" / "tiny-llm"))
    if args.image is None:
        from PIL import Image
        from skimage import data

        image = Image.fromarray(data.chelsea())
    else:
        image = load_image(args.image)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(cfg)
    pixels = eval_transform(cfg.vision.image_size)(image).unsqueeze(0)
    with torch.no_grad():
        loss = model.loss(pixels, [args.text])
    print(f"model: vision {cfg.vision.arch} depth {cfg.vision.depth}, Q-Former {cfg.qformer.num_layers} layers, "
          f"LLM {cfg.llm.path}")
    print(f"loss on {args.text!r}: {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")
    return 0
