"""`minigpt4 serve`: an OpenAI-compatible HTTP API (POST /v1/chat/completions) for a model config."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from minigpt4.commands.model_options import add_model_arguments, load_model
from minigpt4.serve.config import API_KEY_ENV, ServeConfig

# ServeConfig fields that get their own --flag (api_key is handled apart: it may come from the environment).
_FLAGGED = [f for f in dataclasses.fields(ServeConfig) if f.name != "api_key"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="model key=value overrides, e.g. llm.path=/models/vicuna-7b")
    server = parser.add_argument_group("server")
    server.add_argument(
        "--api-key", default=None,
        help=f"require 'Authorization: Bearer KEY' (default: the {API_KEY_ENV} environment variable; unset = no key)",
    )
    defaults = ServeConfig()
    for spec in _FLAGGED:
        default = getattr(defaults, spec.name)
        flag = "--" + spec.name.replace("_", "-")
        if isinstance(default, bool):
            server.add_argument(flag, action="store_true", help=spec.metadata["help"])
        else:
            server.add_argument(flag, type=type(default), default=default,
                                help=f"{spec.metadata['help']} (default: {default!r})")


def run(args: argparse.Namespace) -> int:
    from minigpt4.serve.api import serve
    from minigpt4.serve.engine import ModelEngine

    config = ServeConfig(
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, ""),
        **{spec.name: getattr(args, spec.name) for spec in _FLAGGED},
    )
    try:
        config.check()
    except ValueError as err:
        print(f"minigpt4 serve: {err}", file=sys.stderr)
        return 2
    engine = ModelEngine(load_model(args, args.overrides), template=config.template)
    print(f"serving {config.model_name!r} on http://{config.host}:{config.port}/v1 "
          f"(API key {'required' if config.api_key else 'not required'})", flush=True)
    serve(engine, config)
    return 0
