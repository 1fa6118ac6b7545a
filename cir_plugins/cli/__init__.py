"""The ``cir-plugins`` console entry point: it dispatches and configures logging (no library module imports
argparse). Each command is a module registered in :data:`COMMANDS` with ``configure(parser)`` and ``run(args) ->
int`` (``configure_<name>`` / ``run_<name>`` where one module serves two); shared flags are in ``_common``."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Callable

from .. import __version__
from ..errors import CIRPluginsError

# subcommand -> (module, one-line help)
COMMANDS = {
    "world": ("cir_plugins.cli.world", "write (or refresh) the synthetic CIR world, in the CIRR layout"),
    "augment": ("cir_plugins.cli.augment", "generate triplets: dedup, caption, pair, template"),
    "build-bank": ("cir_plugins.cli.build_bank", "encode every gallery image once into a negative bank"),
    "stage1": ("cir_plugins.cli.stage1", "fine-tune with in-batch negatives (the base model's own recipe)"),
    "stage2": ("cir_plugins.cli.stage2", "fine-tune the query side against the bank"),
    "evaluate": ("cir_plugins.cli.evaluate", "evaluate with the FashionIQ or CIRR protocol"),
    "submit": ("cir_plugins.cli.evaluate", "write the two CIRR test-server files"),
    "share": ("cir_plugins.cli.share", "a trained result as a folder to publish (weights, config, model card), --push"),
    "convert": ("cir_plugins.cli.convert", "a torch.save checkpoint -> safetensors, read weights-only (no code runs)"),
    "recipe": ("cir_plugins.cli.recipe", "the paper's recipes per model and dataset: list, show, run one end to end"),
    "check-data": ("cir_plugins.cli.check_data",
                   "check a CIRR or FashionIQ download: files, images, duplicates, counts"),
    "serve": ("cir_plugins.cli.serve", "a local web page: composed search over a saved bank and its images"),
    "show": ("cir_plugins.cli.show",
             "what a model retrieves: an HTML page and a PNG of top-k per query, --compare two"),
}


# the library's advice in its Python spelling -> the same advice as a command-line flag
CLI_SPELLINGS = {
    "on_bad_record='skip'": "--on-bad-record skip",
    "on_bad_record=\"skip\"": "--on-bad-record skip",
    "skip_missing=True": "--skip-missing",
    "overwrite=True": "--overwrite",
    "fit(resume=True, allow_data_change=True)": "--resume --allow-data-change",
}


def cli_spelling(message: str) -> str:
    """``message`` with the library's keyword-argument advice written as the command line's flags."""
    for python, flag in CLI_SPELLINGS.items():
        message = message.replace(python, flag)
    return message


def _functions(name: str) -> tuple[Callable, Callable]:
    """(configure, run) of command ``name``."""
    module = importlib.import_module(COMMANDS[name][0])
    suffix = name.replace("-", "_")
    return (getattr(module, f"configure_{suffix}", None) or module.configure,
            getattr(module, f"run_{suffix}", None) or module.run)


def build_parser(prog: str = "cir-plugins", *, only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, that command's options alone are declared (the others by name and
    help), so ``cir-plugins COMMAND`` imports one command's module."""
    parser = argparse.ArgumentParser(prog=prog, description="Scale the positives and negatives of a CIR model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            _functions(name)[0](command_parser)
    return parser


def _dispatch(name: str, args: argparse.Namespace, verbose: bool) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_functions(name)[1](args) or 0)
    except (CIRPluginsError, OSError) as error:  # OSError: a read-only or full folder, a missing path
        logging.getLogger(__name__).debug("the error's traceback (shown with -v)", exc_info=True)
        text = cli_spelling(str(error)) if isinstance(error, CIRPluginsError) else os_error_text(error)
        print(f"cir-plugins {name}: error: {text}", file=sys.stderr)
        return 2


# what to do about a file system error, by errno (the default: check the path)
_OS_FIXES = {
    errno.EACCES: "make the folder writable (or readable) for you, or choose another path",
    errno.EPERM: "make the folder writable (or readable) for you, or choose another path",
    errno.EROFS: "the file system is mounted read-only: choose a path on a writable one",
    errno.ENOSPC: "the disk is full: free some space or choose a path on another disk",
    errno.EDQUOT: "your disk quota is used up: free some space or choose a path on another disk",
    errno.EISDIR: "a folder is in the way: name a file, or move the folder",
    errno.ENOTDIR: "a file is in the way where a folder is needed: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "shorten the path",
    errno.ELOOP: "replace the looping symbolic link",
}


def os_error_text(error: OSError) -> str:
    """One line for a file system error: the path, the cause and what to do (no traceback, no errno number)."""
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    cause = error.strerror or str(error) or type(error).__name__
    where = " -> ".join(repr(p) for p in paths) if paths else "a file"
    return f"cannot use {where}: {cause}. Fix: {_OS_FIXES.get(error.errno, 'check the path and its folder')}."


def main(argv: list[str] | None = None) -> int:
    """``cir-plugins COMMAND ...``: parse, configure logging, run; a library error is one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=next((word for word in argv if not word.startswith("-")), "")).parse_args(argv)
    return _dispatch(args.command, args, args.verbose)


def run_command(name: str, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """One command on its own (``prog`` names it in usage lines): ``python -m cir_plugins.data.synthetic``
    is ``run_command("world", prog=...)``."""
    parser = argparse.ArgumentParser(prog=prog or f"cir-plugins {name}", description=COMMANDS[name][1])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    _functions(name)[0](parser)
    args = parser.parse_args(argv)
    return _dispatch(name, args, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
