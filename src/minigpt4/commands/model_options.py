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

from minigpt4.chat.defaults import DECODING_FIELDS, ChatDefaults
from minigpt4.chat.generation import GenerationSettings
from minigpt4.chat.templates import TEMPLATE_NAMES
from minigpt4.commands import CommandError
from minigpt4.hub.sources import released_size

# `section.key=value`: how an override differs from a question or a path among positional arguments.
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--preset", default=None,
                       help="model preset: minigpt4-7b, minigpt4-13b, minigpt4-llama2-7b, embedded, or tiny (random "
                       "weights: a plumbing demo)")
    group.add_argument("--config", type=Path, help="a model YAML file (applied over the preset, default minigpt4-13b)")
    group.add_argument("--checkpoint", type=Path, help="a folder written by save_pretrained (replaces preset weights)")
    group.add_argument("--no-fetch", action="store_true",
                       help="never download: a released file missing from the cache is an error (MINIGPT4_OFFLINE=1)")


def add_generation_arguments(parser: argparse.ArgumentParser, greedy_default: bool = False) -> None:
    """Decoding and conversation flags. Each one left out takes the model's recorded default
    (`model.chat_defaults`); `greedy_default` makes greedy the default for models that record no decoding."""
    defaults = GenerationSettings()
    group = parser.add_argument_group("generation (default: what the model records, see `model ready` line)")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False, help="greedy decoding")
    mode.add_argument("--sample", dest="do_sample", action="store_const", const=True, help="sample")
    group.set_defaults(do_sample=None, greedy_unless_recorded=greedy_default)
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int, help="0 = off")
    group.add_argument("--num-beams", type=int)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--max-context", type=int, default=defaults.max_context, help="prompt + answer tokens")
    group.add_argument("--stop", action="append", default=[], help="an extra stop string (repeatable)")
    group.add_argument("--seed", type=int, default=None, help="seed sampling for reproducible answers")
    group.add_argument("--template", default=None, choices=TEMPLATE_NAMES, help="conversation format")
    group.add_argument("--system", default=None, help="system text ('' for none; default: the model's or template's)")


def _decoding_flags(args: argparse.Namespace) -> dict:
    """The decoding flags given on the command line (the ones left out are None or absent)."""
    return {name: getattr(args, name) for name in DECODING_FIELDS if getattr(args, name, None) is not None}


def generation_settings(args: argparse.Namespace, base: GenerationSettings | None = None) -> GenerationSettings:
    """`base` (default: the release's) with the decoding flags applied; invalid values are a usage error."""
    try:
        return (base or GenerationSettings()).replace(
            **_decoding_flags(args), stop=list(args.stop), seed=args.seed, max_context=args.max_context
        )
    except ValueError as err:
        raise CommandError(str(err)) from err


def _flag_name(field: str, value: object) -> str:
    if field == "do_sample":
        return "--sample" if value else "--greedy"
    return "--" + field.replace("_", "-")


def apply_chat_flags(args: argparse.Namespace, defaults: ChatDefaults) -> ChatDefaults:
    """A model's chat defaults with the template, system and decoding flags applied; the sources name the flags."""
    template = getattr(args, "template", None) or None
    system = getattr(args, "system", None)
    if template is not None:
        defaults = defaults.replace(template=template, system=system, template_source="--template")
    elif system is not None:
        defaults = defaults.replace(system=system, template_source=f"{defaults.template_source}, --system")
    flags = _decoding_flags(args)
    generation, source = defaults.generation, defaults.generation_source
    if flags:
        try:
            generation = generation.replace(**flags)
        except ValueError as err:
            raise CommandError(str(err)) from err
        source += "; " + ", ".join(_flag_name(name, value) for name, value in flags.items())
    if "do_sample" not in flags and not defaults.generation_recorded and getattr(args, "greedy_unless_recorded", False):
        generation = generation.replace(do_sample=False)
        source += "; greedy: this command's default when the model records no decoding"
    return defaults.replace(generation=generation, generation_source=source)


def split_overrides(items: list[str], keep: Callable[[str], bool] = lambda item: False) -> tuple[list[str], list[str]]:
    """Positional arguments -> (overrides like `llm.path=/x`, the rest); `keep(item)` forces "the rest"."""
    overrides = [item for item in items if OVERRIDE.match(item) and not keep(item)]
    return overrides, [item for item in items if item not in overrides]


# The dataclass defaults are the released 13B model; a --config or --checkpoint without --preset starts from them.
BASE_PRESET = "minigpt4-13b"
DEFAULT_PRESET = "minigpt4-7b"
QUICKSTART_MODEL = Path("quickstart/model")
NO_MODEL = (
    "no model given and none found (no complete minigpt4-7b in the cache, no ./quickstart/model): "
    f"`minigpt4 fetch minigpt4-7b` downloads the released 7B model (~{released_size(DEFAULT_PRESET)}); "
    "`minigpt4 quickstart` trains a small "
    "CPU model in minutes into ./quickstart/model; or pass `--checkpoint DIR` (a folder written by save_pretrained). "
    "`--preset tiny` runs random weights (a plumbing demo)"
)


def choose_default_model(args: argparse.Namespace) -> None:
    """The default-model rule, in one place: fill in `args.preset`/`args.checkpoint` when no model option is given.

    In order: `--checkpoint` (or any model option) as given; the released 7B model when it is complete in the
    cache; `./quickstart/model` when it exists (said on stderr); otherwise an error listing the three ways to
    get a model. Never silently random weights.
    """
    if args.preset is not None or args.checkpoint is not None or args.config is not None:
        return
    from minigpt4.hub.fetch import preset_cached

    if preset_cached(DEFAULT_PRESET):
        args.preset = DEFAULT_PRESET
        print(f"no model given: using {DEFAULT_PRESET} from the cache", file=sys.stderr, flush=True)
    elif QUICKSTART_MODEL.is_dir():
        args.checkpoint = QUICKSTART_MODEL
        print(f"no model given: using ./{QUICKSTART_MODEL} (the model `minigpt4 quickstart` trained)",
              file=sys.stderr, flush=True)
    else:
        raise CommandError(NO_MODEL)


def fill_released_files(cfg, preset: str, no_fetch: bool, roles: tuple[str, ...] | None = None) -> None:
    """Empty weight paths of a released preset come from the cache, fetched on first use (see hub.fetch)."""
    from minigpt4.hub.fetch import ROLE_FIELDS, DownloadError, fill_from_cache
    from minigpt4.hub.sources import PRESETS

    if preset not in PRESETS:
        return
    try:
        fill_from_cache(cfg, preset, allow_fetch=not no_fetch, roles=roles or tuple(ROLE_FIELDS),
                        report=lambda line: print(line, file=sys.stderr, flush=True))
    except DownloadError as err:
        raise CommandError(str(err)) from None


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
    elif args.preset is not None:  # a released preset named (or chosen by default), not only implied by --config
        fill_released_files(cfg, args.preset, args.no_fetch)
    if args.checkpoint is None and not cfg.llm.path and args.preset == "tiny":
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
    model.chat_defaults = apply_chat_flags(args, model.chat_defaults)
    quantized = "" if model.config.llm.quantization == "none" else f" in {model.config.llm.quantization}"
    print(f"model ready in {time.perf_counter() - start:.1f} s (LLM {model.config.llm.path}{quantized}, "
          f"device {model.device}, "
          f"dtype {model.config.dtype} ({model.dtype_reason})); "
          f"{model.chat_defaults.describe()}", file=sys.stderr, flush=True)
    random = random_parts(cfg, model.config.llm.path)
    if random:
        print(f"*** random weights: {', '.join(random)} (no weight files for them), so the output is noise. "
              "For a real model: `minigpt4 quickstart`, then --checkpoint quickstart/model; or the released files "
              "(README: Loading the released MiniGPT-4) ***", file=sys.stderr, flush=True)
    return model
