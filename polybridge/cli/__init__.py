"""The ``polybridge`` command line.

Every command reads the registry (``--registry PATH``, ``$POLYBRIDGE_REGISTRY``, or the nearest
``registry.yaml``). A user's mistake (a :class:`~polybridge.errors.PolyBridgeError`, or the operating system
refusing a path the user named) prints one line naming the file, key or argument and exits with code 2; any
other exception is a bug in polybridge and shows its traceback. Heavy libraries are imported only by the commands
that need them. Set ``POLYBRIDGE_DEBUG=1`` to get the full traceback instead of the one-line message.

A thin door: one module per command group (:mod:`~polybridge.cli.registry`, :mod:`~polybridge.cli.synth`,
:mod:`~polybridge.cli.generate`, :mod:`~polybridge.cli.route`, :mod:`~polybridge.cli.tokenizer`,
:mod:`~polybridge.cli.train`, :mod:`~polybridge.cli.bench`, :mod:`~polybridge.cli.serve`), each adding its own subcommands to the parser and
handing the work to the library; :mod:`~polybridge.cli.common` holds what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from polybridge import __version__
from polybridge.cli import bench, generate, registry, route, serve, synth, tokenizer, train
from polybridge.cli.common import EXIT_USAGE, CommandError, check_text_arguments, run_command
from polybridge.errors import PolyBridgeError

__all__ = ["CommandError", "EXIT_USAGE", "build_parser", "main"]

#: The command groups, in the order ``polybridge --help`` lists them.
GROUPS = (registry, synth, generate, route, tokenizer, train, bench, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polybridge",
        description="One frozen English text-to-image backbone, many native-language branches.",
        epilog="Run `polybridge COMMAND --help` for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"polybridge {__version__}")
    parser.add_argument("--registry", metavar="PATH", default=None,
                        help="registry.yaml or its folder (default: $POLYBRIDGE_REGISTRY, else the nearest registry.yaml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        check_text_arguments(args)
        return run_command(func, args)
    except BrokenPipeError:
        # The reader went away (`polybridge registry show zh | head`): stop quietly, as `cat` does. Later writes
        # (and the interpreter's final flush) go to /dev/null so no second error is printed.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except PolyBridgeError as exc:
        if os.environ.get("POLYBRIDGE_DEBUG"):
            raise
        print(f"polybridge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("polybridge: interrupted", file=sys.stderr)
        return 130
