"""`minigpt4 export --format transformers OUT`: the model as a plain transformers BLIP-2 folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt4.commands import CommandError
from minigpt4.commands.model_options import add_model_arguments, load_model, model_config_from_args, split_overrides

FORMATS = ("transformers",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, metavar="OUT", help="the folder to write (new or empty)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="section.key=value model config overrides")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="transformers: a folder Blip2ForConditionalGeneration.from_pretrained loads")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from minigpt4.export import check_exportable, export_transformers

    overrides, rest = split_overrides(args.overrides)
    if rest:
        raise CommandError(f"unexpected argument(s) {' '.join(rest)}: give OUT once, then section.key=value overrides")
    if args.output.exists() and not args.output.is_dir():
        raise CommandError(f"{args.output} exists and is not a folder: give a new folder as OUT")
    if args.output.is_dir() and any(args.output.iterdir()) and not args.overwrite:
        raise CommandError(f"{args.output} is not empty: give a new folder, or --overwrite")
    from minigpt4.model.minigpt4 import read_folder

    config = model_config_from_args(args, overrides)  # refuse a tower BLIP-2 cannot hold before loading anything
    if config.llm.quantization != "none":
        raise CommandError(f"model.llm.quantization={config.llm.quantization!r}: an export holds the LLM's full "
                           "weights; leave model.llm.quantization=none")
    check_exportable(read_folder(args.checkpoint)[0] if args.checkpoint is not None else config)
    model = load_model(args, overrides)
    report = export_transformers(model, args.output, overwrite=True)
    print(f"wrote {report.directory}: Blip2ForConditionalGeneration + processor, image token id "
          f"{report.image_token_id}; image embeddings within {report.image_embeds_max_diff:.1e} of minigpt4's; "
          f"see {report.directory / 'README.md'} for how to build inputs", file=sys.stderr)
    return 0
