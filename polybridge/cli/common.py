"""What every command group shares: the registry from ``--registry``, tables, JSON, argument types, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from polybridge.registry import Registry, load_registry


EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


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
