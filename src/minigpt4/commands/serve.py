"""`minigpt4 serve`: an OpenAI-compatible HTTP API (POST /v1/chat/completions) for a model config."""

from __future__ import annotations

import argparse
import dataclasses
import os

from minigpt4.cli import CommandError
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
        flag = spec.metadata["flag"] or "--" + spec.name.replace("_", "-")
        if isinstance(default, bool):
            server.add_argument(flag, dest=spec.name, action="store_true", help=spec.metadata["help"])
        elif isinstance(default, tuple):
            server.add_argument(flag, dest=spec.name, action="append", default=[],
                                metavar=flag.rsplit("-", 1)[-1].upper(), help=spec.metadata["help"])
        else:
            server.add_argument(flag, dest=spec.name, type=type(default), default=default,
                                help=f"{spec.metadata['help']} (default: {default!r})")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The checked ServeConfig the flags describe; a bad value is a usage error (`error: ...`, exit 2)."""
    from minigpt4.serve.transport import ensure_file_limit

    values = {spec.name: getattr(args, spec.name) for spec in _FLAGGED}
    config = ServeConfig(
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, ""),
        **{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()},
    )
    try:
        config.check()
        ensure_file_limit(config)
    except ValueError as err:
        raise CommandError(str(err)) from None
    return config


def run(args: argparse.Namespace) -> int:
    from minigpt4.serve.api import serve
    from minigpt4.serve.engine import ModelEngine

    config = serve_config(args)
    # load_model applies --template to the model's recorded chat defaults, which the engine then uses.
    engine = ModelEngine(load_model(args, args.overrides), system=config.system_prompt or None)
    print(f"serving {config.model_name!r} on http://{config.host}:{config.port}/v1 "
          f"(API key {'required' if config.api_key else 'not required'})", flush=True)
    serve(engine, config)
    return 0
