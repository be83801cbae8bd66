"""`minigpt4 demo`: the Gradio web demo on 127.0.0.1:7860 (a public share link only with --share)."""

from __future__ import annotations

import argparse
import os

from minigpt4.commands import CommandError
from minigpt4.commands.model_options import (
    add_generation_arguments,
    add_model_arguments,
    generation_settings,
    load_model,
    split_overrides,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("overrides", nargs="*", help="model key=value overrides, e.g. llm.path=/models/vicuna-7b")
    add_model_arguments(parser)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    overrides, rest = split_overrides(args.overrides)
    if rest:
        raise CommandError(f"expected section.key=value overrides, got {' '.join(rest)}")
    if not 1 <= args.port <= 65535:
        raise CommandError(f"--port must be between 1 and 65535, got {args.port}")
    generation_settings(args)  # bad decoding flags fail before the model loads
    model = load_model(args, overrides)  # once, before the page is served (and before gradio's slow import)
    from minigpt4.serve.gradio_app import build_demo, launch

    demo = build_demo(model, generation_settings(args, model.chat_defaults.generation))  # template: the model's
    print(f"demo on http://{args.host}:{args.port}" + (" (and a public share link)" if args.share else ""), flush=True)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as err:  # gradio's answer when the address is taken or cannot be bound
        raise CommandError(f"cannot serve the demo on {args.host}:{args.port}: {err}") from err
    return 0
