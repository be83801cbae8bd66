"""One module per `minigpt4` subcommand, each with `add_arguments(parser)` and `run(args)`."""


class CommandError(Exception):
    """A usage or input error a command reports as one line `error: ...` on stderr, exiting with status 2.

    It lives here rather than in `minigpt4.cli` so that it is one class even when the CLI runs as
    `python -m minigpt4.cli` (that module is then `__main__`, and its classes are copies).
    """
