"""`minigpt4 serve`: an OpenAI-compatible HTTP API (POST /v1/chat/completions) for a model config."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from minigpt4.config import model_config
from minigpt4.serve.config import API_KEY_ENV, ServeConfig

log = logging.getLogger(__name__)

# ServeConfig fields that get their own --flag (api_key is handled apart: it may come from the environment).
_FLAGGED = [f for f in dataclasses.fields(ServeConfig) if f.name != "api_key"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset: tiny, embedded, minigpt4-7b, minigpt4-13b")
    parser.add_argument("--config", type=Path, help="a model YAML file (overrides the preset)")
    parser.add_argument(
        "--api-key", default=None,
        help=f"require 'Authorization: Bearer KEY' (default: the {API_KEY_ENV} environment variable; unset = no key)",
    )
    defaults = ServeConfig()
    for spec in _FLAGGED:
        default = getattr(defaults, spec.name)
        flag = "--" + spec.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=spec.metadata["help"])
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"{spec.metadata['help']} (default: {default!r})")
    parser.add_argument("overrides", nargs="*", help="model key=value overrides, e.g. llm.path=/models/vicuna-7b")


def run(args: argparse.Namespace) -> int:
    import torch

    from minigpt4.model.build import build_model
    from minigpt4.serve.api import serve
    from minigpt4.serve.engine import ModelEngine

    config = ServeConfig(
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, ""),
        **{spec.name: getattr(args, spec.name) for spec in _FLAGGED},
    )
    config.check()
    cfg = model_config(args.preset, args.config, args.overrides)
    if not cfg.llm.path and args.preset == "tiny":
        from minigpt4.testing import build_tiny_llm

        cfg.llm.path = str(build_tiny_llm(Path.home() / ".cache" / "minigpt4" / "tiny-llm"))
    torch.manual_seed(0)  # towers without weight files (tiny preset) come out the same every run
    log.info("loading the model (preset %s%s)", args.preset, f", {args.config}" if args.config else "")
    engine = ModelEngine(build_model(cfg), template=config.template)
    print(f"serving {config.model_name!r} on http://{config.host}:{config.port}/v1 "
          f"(API key {'required' if config.api_key else 'not required'})", flush=True)
    serve(engine, config)
    return 0
