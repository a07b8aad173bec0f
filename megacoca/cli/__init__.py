"""`megacoca` command line: a thin dispatch; each subcommand module of this package registers its own parser.

The command-line layer is the top floor: argument parsing and the checks of what arguments and configs point at
(files, shards, tokenizers, checkpoints, the layout: megacoca.cli.inputs), for train, eval, data, tokenizer,
convert and plan. Subcommand modules import torch and the heavy packages inside their commands, so that
`megacoca --help` stays fast.

Bad input is one line on stderr, `megacoca <command>: error: <what is wrong>`, and exit code 2, before the
command does any work: argparse errors (ArgumentParser below) and the `ConfigError`s a command raises while
checking its input (megacoca.cli.inputs) alike.
"""

import argparse
import importlib
import os
import sys

from megacoca.config.train import ConfigError

# Modules that define `register(subparsers)`, each adding its own subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "megacoca.cli.train",
    "megacoca.cli.eval",
    "megacoca.cli.data",
    "megacoca.cli.tokenizer",
    "megacoca.cli.convert",
    "megacoca.cli.plan",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: message`, no usage block: that is `--help`), exit 2.
    Sub-parsers inherit the class. Under a launcher only rank 0 prints, so N ranks do not print N copies."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":
            self._print_message(f"{self.prog}: error: {' '.join(message.split())}\n", sys.stderr)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megacoca", description="Train, evaluate and convert CoCa models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def _prog(args) -> str:
    """`megacoca data from-folder`: the command words the user typed, for the error line."""
    words = ["megacoca", args.command]
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join(words + ([sub] if sub else []))


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named after the subcommand they were given to, not the top-level `megacoca`
            parser.prog = _prog(args) if getattr(args, "command", None) else parser.prog
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # argparse: --help (0) or a bad argument (2, its line already printed)
        return stop.code if isinstance(stop.code, int) else 2
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ConfigError as error:
        print(f"{_prog(args)}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
