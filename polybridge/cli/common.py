"""What every command group shares: the registry from ``--registry``, tables, JSON, argument types, errors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from polybridge.errors import PolyBridgeError
from polybridge.registry import Registry, load_registry


EXIT_USAGE = 2


class CommandError(PolyBridgeError):
    """A user-facing error: printed as one line, exit code 2."""


#: Arguments that name a path the user chose, and how ``--help`` spells each.
PATH_ARGUMENTS = {"registry": "--registry", "output": "-o", "out": "--out", "file": "--file", "dir": "DIR",
                  "scorer": "--scorer", "work": "--work", "init_from": "--init-from"}


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)``, with the operating system's refusal of a path the user named (a missing folder, permission
    denied, a full disk) turned into a :class:`CommandError` (one line, exit 2) naming the argument and the path.
    An ``OSError`` on any other path, like any other exception that is not a :class:`PolyBridgeError`, is not the
    user's doing and keeps its traceback."""
    try:
        return func(args)
    except OSError as exc:
        named = None if isinstance(exc, PolyBridgeError) else _user_path(args, exc)
        if named is None:
            raise
        flag, value, exact = named
        where = "" if exact else f" ({exc.filename})"
        raise CommandError(f"{flag} {value}: {exc.strerror or exc}{where}") from exc


def _user_path(args: argparse.Namespace, exc: OSError) -> tuple[str, str, bool] | None:
    """(argument, its value, whether the error is about that very path) when ``exc`` concerns a path the user named:
    that path, something inside it, or the temporary sibling an atomic write makes beside it."""
    if exc.filename is None:
        return None
    failed = Path(os.fsdecode(exc.filename)).expanduser().resolve()
    for attr, flag in PATH_ARGUMENTS.items():
        value = getattr(args, attr, None)
        if not isinstance(value, (str, Path)):
            continue
        path = Path(value).expanduser().resolve()
        sibling = failed.parent == path.parent and failed.name.startswith(f".{path.name}.")
        if failed == path or path in failed.parents or sibling:
            return flag, str(value), failed == path
    return None


def registry_of(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


def width(text: str) -> int:
    """Columns a string takes in a terminal (CJK characters take two)."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(width(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[Any]) -> str:
        return "  ".join(str(c) + " " * (w - width(str(c))) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def words(values: Sequence[str] | None) -> list[str]:
    """``--langs zh ja`` and ``--langs zh,ja`` alike."""
    return [w for v in values or () for w in v.replace(",", " ").split()]


def read_prompt_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"--file {file}: no such file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CommandError(f"--file {file}: not UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in lines]
    if not any(prompts):
        raise CommandError(f"--file {file}: holds no prompts (one prompt per line)")
    empty = [i + 1 for i, line in enumerate(prompts) if not line]
    if empty:
        raise CommandError(f"--file {file}: line {empty[0]} is empty; write one prompt per line "
                           "(an empty prompt would silently give an unconditional image)")
    return prompts
