"""The ``cir-plugins`` console entry point.

Each subcommand lives in the module that owns its work and exposes two functions:
``configure(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
This file only dispatches; it is the one place (with examples/) that owns the console and logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import CIRPluginsError

# subcommand -> (module, one-line help)
COMMANDS = {
    "augment": ("cir_plugins.positives.command", "generate triplets: dedup, caption, pair, template"),
    "build-bank": ("cir_plugins.negatives.command", "encode every gallery image once into a negative bank"),
    "stage2": ("cir_plugins.training.command", "fine-tune the query side against the bank"),
    "evaluate": ("cir_plugins.evaluation_command", "evaluate with the FashionIQ or CIRR protocol"),
    "submit": ("cir_plugins.evaluation_command", "write the two CIRR test-server files"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cir-plugins", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        configure = getattr(module, f"configure_{name.replace('-', '_')}", None) or module.configure
        configure(command_parser)
        command_parser.set_defaults(_module=module_name, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(args._module)
    run = getattr(module, f"run_{args._name.replace('-', '_')}", None) or module.run
    try:
        return int(run(args) or 0)
    except CIRPluginsError as error:
        print(f"cir-plugins {args._name}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
