"""One module per `minigpt4` subcommand, each with `add_arguments(parser)` and `run(args)`."""
