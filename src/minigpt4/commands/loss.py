"""`minigpt4 loss`: build a model from a config and print its loss on one image and caption."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minigpt4.commands.model_options import add_model_arguments, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, help="an image file (default: a CC0 photo from scikit-image)")
    parser.add_argument("--text", default="a cat lying on a blanket", help="the caption to score")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. llm.path=/models/vicuna-7b")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from minigpt4.processing.image import eval_transform, load_image

    if args.image is None:
        from PIL import Image
        from skimage import data

        image = Image.fromarray(data.chelsea())
    else:
        image = load_image(args.image)
    start = time.perf_counter()
    model = load_model(args, args.overrides)
    cfg = model.config
    pixels = eval_transform(cfg.vision.image_size)(image).unsqueeze(0)
    with torch.no_grad():
        loss = model.loss(pixels, [args.text])
    connector = f"Q-Former {cfg.qformer.num_layers} layers" if cfg.connector == "qformer" else "tokens merged 4 at a time"
    print(f"model: vision {cfg.vision.arch} depth {cfg.vision.depth}, {connector} ({cfg.num_image_tokens} image "
          f"tokens), LLM {cfg.llm.path}")
    print(f"loss on {args.text!r}: {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")
    return 0
