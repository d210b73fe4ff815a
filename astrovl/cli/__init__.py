"""The ``astrovl`` command line.

Each command family lives in its own module (:mod:`~astrovl.cli.images`,
:mod:`~astrovl.cli.llava`, :mod:`~astrovl.cli.datasets`,
:mod:`~astrovl.cli.training`, :mod:`~astrovl.cli.evaluation`,
:mod:`~astrovl.cli.demo`, :mod:`~astrovl.cli.serve`) and registers its subcommands; a subcommand parses
its arguments and calls library functions, the logic lives in the library.
Errors are printed as one line with a non-zero exit code (full tracebacks with
``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import datasets, demo, evaluation, images, llava, serve, training

__all__ = ["main", "build_parser"]

EPILOG = "Run 'astrovl COMMAND --help' for the options and examples of each command."

#: command families in the order their commands appear in ``astrovl --help``
FAMILIES = (images, llava, datasets, training, evaluation, serve, demo)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``astrovl`` command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="astrovl",
        description="Astronomical images and natural language: CLIP search and LLaVA captions "
        "for FITS images.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"astrovl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in FAMILIES:
        family.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "device", None) is not None:
            from ..utils.devices import resolve_device

            resolve_device(args.device)  # a device this machine lacks is an error, before any work
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("astrovl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if args.debug:
            raise
        from ._common import error_message

        print(f"astrovl {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return 1
