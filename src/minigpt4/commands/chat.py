"""`minigpt4 chat`: ask about images from the terminal, once or interactively (streamed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigpt4.commands import CommandError
from minigpt4.commands.model_options import (
    add_generation_arguments,
    add_model_arguments,
    generation_settings,
    load_model,
    split_overrides,
)

HELP = "commands: /image PATH (add an image), /reset (new conversation), /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, action="append", default=[], help="an image (repeatable)")
    parser.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    parser.add_argument(
        "words", nargs="*", metavar="QUESTION | KEY=VALUE",
        help="the question (none: interactive session); section.key=value items override the model config",
    )
    add_model_arguments(parser)
    add_generation_arguments(parser)


def _say(chat, stream: bool) -> None:
    if stream:
        for piece in chat.stream():
            print(piece, end="", flush=True)
        print()
    else:
        print(chat.answer())


def _interactive(chat, stream: bool) -> int:
    """Read questions until /quit or the end of the input (a pipe or file that ends, Ctrl-D, Ctrl-C)."""
    from minigpt4.processing.image import ImageError

    print(HELP)
    while True:
        try:
            if sys.stdin is None or sys.stdin.closed:  # started with stdin closed (`<&-`): nothing will come
                raise EOFError
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            print("(new conversation)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                chat.upload(Path(path).expanduser())
                print(f"(image {path} added)")
            except (ImageError, FileNotFoundError, IsADirectoryError) as err:
                print(f"error: {err}")
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}")
            continue
        chat.ask(line)
        print("minigpt4> ", end="", flush=True)
        try:
            _say(chat, stream)
        except ValueError as err:  # e.g. the question alone does not fit max_context
            chat.withdraw_question()
            print(f"\nerror: {err}")


def run(args: argparse.Namespace) -> int:
    from minigpt4.chat import Chat
    from minigpt4.processing.image import ImageError, check_image_file, eval_transform

    overrides, words = split_overrides(args.words)
    question = " ".join(words).strip()
    generation_settings(args)  # bad decoding flags fail before the model loads
    for path in args.image:  # before the model loads; from stat alone: a FIFO or /dev/zero is never opened
        try:
            check_image_file(path)
        except FileNotFoundError:
            raise CommandError(f"--image {path}: no such file") from None
        except ImageError as err:
            raise CommandError(str(err)) from None
    model = load_model(args, overrides)  # its chat_defaults: what the model records, with the flags applied
    chat = Chat(model, eval_transform(model.config.vision.image_size),
                settings=generation_settings(args, model.chat_defaults.generation))
    for path in args.image:
        chat.upload(path)  # an ImageError is an input error: one line, status 2
    if not question:
        return _interactive(chat, stream=not args.no_stream)
    chat.ask(question)
    try:
        _say(chat, stream=not args.no_stream)
    except ValueError as err:  # e.g. the question alone does not fit max_context
        raise CommandError(str(err)) from err
    return 0
