"""The `minigpt4` command line.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args)`;
the table below is the whole list. Modules are imported only when their command runs, so
`minigpt4 --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing

from minigpt4.commands import CommandError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors read like every other input error: one `error: ...` line, status 2."""

    def error(self, message: str) -> typing.NoReturn:
        _report(f"{self.prog}: {message} (see {self.prog} --help)")
        sys.exit(2)


def _report(message: str) -> None:
    print("error: " + " ".join(message.splitlines()), file=sys.stderr, flush=True)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message says what is wrong with the user's input (imported only once one is raised).

    Besides CommandError: the library's own input errors (a config value, a checkpoint file, an
    image) and the OS's answers about a path the user gave.
    """
    from minigpt4.config import ConfigError
    from minigpt4.convert import CheckpointError
    from minigpt4.processing.image import ImageError

    return (CommandError, ConfigError, CheckpointError, ImageError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError)


# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "loss": ("minigpt4.commands.loss", "build a model and print its loss on an image and a caption"),
    "data": ("minigpt4.commands.data", "make webdataset shards from images + captions; check shards or aligned folders"),
    "train": ("minigpt4.commands.train", "train the projection (stage 1 or 2) from a job YAML; works under torchrun"),
    "cache-features": ("minigpt4.commands.cache_features", "precompute frozen image features for faster training"),
    "quickstart": ("minigpt4.commands.quickstart", "train the embedded CPU model on generated data, evaluate and chat (offline)"),
    "serve": ("minigpt4.commands.serve", "serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions)"),
    "chat": ("minigpt4.commands.chat", "ask about images from the terminal: one question, or an interactive session"),
    "caption": ("minigpt4.commands.caption", "describe folders, image lists or webdataset shards in batches (JSONL)"),
    "eval": ("minigpt4.commands.eval", "score a model on COCO captions, VQAv2, OK-VQA, GQA, POPE or Q&A folders"),
    "demo": ("minigpt4.commands.demo", "the Gradio web demo: upload an image and chat about it"),
    "fetch": ("minigpt4.commands.fetch", "download and verify the released weights of a preset into the cache"),
    "apply-delta": ("minigpt4.commands.apply_delta", "base + delta weights (Vicuna v0) -> a model folder, shard by shard"),
    "make-delta": ("minigpt4.commands.make_delta", "the delta from a base model to a target (reverse of apply-delta)"),
    "export": ("minigpt4.commands.export", "write the model as a plain transformers BLIP-2 folder"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minigpt4", description="MiniGPT-4: train, chat, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    position = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if position is None or argv[position] not in COMMANDS:
        _top_parser().parse_args(argv)  # prints usage and exits
        return 2
    name = argv.pop(position)
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"minigpt4 {name}", description=COMMANDS[name][1])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except _input_errors() as err:
        logging.getLogger(__name__).debug("the error's traceback", exc_info=True)  # shown with --verbose
        _report(str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
