"""`megacoca` command line: a thin dispatch; each area registers its own subcommands."""

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`, each adding its own subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "megacoca.train",
    "megacoca.eval.cli",
    "megacoca.data.cli",
    "megacoca.checkpoint.convert_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacoca", description="Train, evaluate and convert CoCa models.")
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
