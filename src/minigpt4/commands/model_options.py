"""Options shared by the commands that load a model (`chat`, `caption`, `demo`, `serve`, `loss`).

The model comes from a preset, a model YAML and `key=value` overrides, or from a `--checkpoint`
folder written by `MiniGPT4.save_pretrained`. With none of `--preset`, `--config` and `--checkpoint`,
`choose_default_model` decides; a model with random parts is announced on stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from minigpt4.chat.generation import GenerationSettings
from minigpt4.chat.templates import TEMPLATE_NAMES
from minigpt4.commands import CommandError

# `section.key=value`: how an override differs from a question or a path among positional arguments.
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--preset", default=None,
                       help="model preset: minigpt4-7b, minigpt4-13b, embedded, or tiny (random weights: a plumbing "
                       "demo)")
    group.add_argument("--config", type=Path, help="a model YAML file (applied over the preset, default minigpt4-13b)")
    group.add_argument("--checkpoint", type=Path, help="a folder written by save_pretrained (replaces preset weights)")


def add_generation_arguments(parser: argparse.ArgumentParser, greedy_default: bool = False) -> None:
    """Decoding flags; `greedy_default` makes greedy the default (with `--sample` to turn sampling on)."""
    defaults = GenerationSettings()
    group = parser.add_argument_group("generation")
    if greedy_default:
        group.add_argument("--sample", dest="greedy", action="store_false", help="sample instead of greedy decoding")
    else:
        group.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    group.set_defaults(greedy=greedy_default)
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--temperature", type=float, default=defaults.temperature)
    group.add_argument("--top-p", type=float, default=defaults.top_p)
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    group.add_argument("--num-beams", type=int, default=defaults.num_beams)
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    group.add_argument("--max-context", type=int, default=defaults.max_context, help="prompt + answer tokens")
    group.add_argument("--stop", action="append", default=[], help="an extra stop string (repeatable)")
    group.add_argument("--seed", type=int, default=None, help="seed sampling for reproducible answers")
    group.add_argument("--template", default="vicuna_v0", choices=TEMPLATE_NAMES, help="conversation format")
    group.add_argument("--system", default=None, help="system text ('' for none; default: the template's)")


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The decoding flags as GenerationSettings; invalid values are a usage error."""
    try:
        return _generation_settings(args)
    except ValueError as err:
        raise CommandError(str(err)) from err


def _generation_settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        stop=list(args.stop),
        seed=args.seed,
        max_context=args.max_context,
    )


def split_overrides(items: list[str], keep: Callable[[str], bool] = lambda item: False) -> tuple[list[str], list[str]]:
    """Positional arguments -> (overrides like `llm.path=/x`, the rest); `keep(item)` forces "the rest"."""
    overrides = [item for item in items if OVERRIDE.match(item) and not keep(item)]
    return overrides, [item for item in items if item not in overrides]


# The dataclass defaults are the released 13B model; a --config or --checkpoint without --preset starts from them.
BASE_PRESET = "minigpt4-13b"
NO_MODEL = (
    "no model given (--preset, --checkpoint or --config). Train the small CPU model in minutes with "
    "`minigpt4 quickstart`, then pass `--checkpoint quickstart/model`; or `--checkpoint DIR` for a folder written by "
    "save_pretrained; or `--preset minigpt4-7b` with the released files (weights.vit=eva_vit_g.pth "
    "weights.blip2=blip2_pretrained_flant5xxl.pth weights.projection=prerained_minigpt4_7b.pth llm.path=VICUNA_DIR); "
    "`--preset tiny` runs random weights (a plumbing demo)"
)


def choose_default_model(args: argparse.Namespace) -> None:
    """The default-model rule, in one place: fill in `args.preset`/`args.checkpoint` when no model option is given.

    Today there is no default: without `--preset`, `--checkpoint` or `--config` the command ends with
    the ways to get a model (never silently random weights).
    """
    if args.preset is None and args.checkpoint is None and args.config is None:
        raise CommandError(NO_MODEL)


def model_config_from_args(args: argparse.Namespace, overrides: list[str]):
    """The ModelConfig the options describe, checked before any loading starts (the device included)."""
    from minigpt4.config import model_config
    from minigpt4.device import check_device
    from minigpt4.model.minigpt4 import CONFIG_NAME

    choose_default_model(args)
    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise CommandError(f"--checkpoint {args.checkpoint}: no such folder (give a folder written by "
                               "save_pretrained, e.g. quickstart/model)")
        if not (args.checkpoint / CONFIG_NAME).is_file():
            raise CommandError(f"--checkpoint {args.checkpoint} has no {CONFIG_NAME}: not a folder written by "
                               "save_pretrained")
    cfg = model_config(args.preset or BASE_PRESET, args.config, overrides)
    check_device(cfg.device)
    if args.checkpoint is not None:
        cfg.weights.pretrained = str(args.checkpoint)
    elif not cfg.llm.path and args.preset == "tiny":
        from minigpt4.model.tiny import prepare_tiny_llm

        cfg.llm.path = str(prepare_tiny_llm())
    return cfg


def load_model(args: argparse.Namespace, overrides: list[str]):
    """Build the model the options describe, reporting progress (and any random weights) on stderr."""
    import torch

    from minigpt4.model.build import build_model, random_parts

    start = time.perf_counter()
    cfg = model_config_from_args(args, overrides)
    source = args.checkpoint or f"preset {args.preset or BASE_PRESET}" + (f" + {args.config}" if args.config else "")
    print(f"loading model from {source} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)  # towers without weight files come out the same every run
    model = build_model(cfg)
    print(f"model ready in {time.perf_counter() - start:.1f} s (LLM {model.config.llm.path}, device {model.device})",
          file=sys.stderr, flush=True)
    random = random_parts(cfg, model.config.llm.path)
    if random:
        print(f"*** random weights: {', '.join(random)} (no weight files for them), so the output is noise. "
              "For a real model: `minigpt4 quickstart`, then --checkpoint quickstart/model; or the released files "
              "(README: Loading the released MiniGPT-4) ***", file=sys.stderr, flush=True)
    return model
