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


def int_upto(high: int, low: int = 1) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` (1) to ``high`` (one of :mod:`polybridge.limits`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,} (polybridge's limit), got {value:,}")
        return value

    parse.__name__ = f"whole number from {low:,} to {high:,}"  # argparse names the type in its message
    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high`` (NaN, inf and 1e308 are refused)."""

    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a finite number from {low:g} to {high:g}, got {text}")
        return value

    parse.__name__ = f"number from {low:g} to {high:g}"
    return parse


def check_grid(n: int, size: int | None, upscale: int) -> None:
    """Refuse a ``generate -o`` grid over :data:`~polybridge.limits.MAX_GRID_PIXELS` before anything is drawn
    (``size`` None: the backbone's, taken as 512 here)."""
    from polybridge.limits import MAX_GRID_PIXELS

    cols, side = min(n, 4), (size or 512) * upscale
    width, height = cols * side, -(-n // cols) * side
    if width * height > MAX_GRID_PIXELS:
        raise CommandError(f"-n {n} images of {size or 512} px at --upscale {upscale} make a {width:,} x {height:,} "
                           f"grid; at most {MAX_GRID_PIXELS:,} pixels: lower -n or --upscale, or use --file DIR")


def words(values: Sequence[str] | None) -> list[str]:
    """``--langs zh ja`` and ``--langs zh,ja`` alike."""
    return [w for v in values or () for w in v.replace(",", " ").split()]


#: The largest ``--file`` of prompts, in bytes.
PROMPT_FILE_MAX_BYTES = 64 << 20


def read_prompt_file(path: str) -> list[str]:
    """The prompts of a ``--file``: one a line, split on ``\\n`` only (a U+2028, form feed or lone ``\\r`` inside a
    line stays in its prompt, so image k is line k+1), a BOM at the start dropped, each line stripped. A file that
    is not a regular file, over PROMPT_FILE_MAX_BYTES or over MAX_PROMPT_LINES lines, not UTF-8, empty, or with an
    empty line is refused."""
    import stat

    from polybridge.limits import MAX_PROMPT_LINES

    file = Path(path)
    try:
        info = file.stat()
    except OSError:
        raise CommandError(f"--file {file}: no such file") from None
    if not stat.S_ISREG(info.st_mode):
        raise CommandError(f"--file {file}: not a regular file; give a UTF-8 text file with one prompt per line")
    if info.st_size > PROMPT_FILE_MAX_BYTES:
        raise CommandError(f"--file {file}: has {info.st_size:,} bytes; at most {PROMPT_FILE_MAX_BYTES:,}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"--file {file}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) > MAX_PROMPT_LINES:
        raise CommandError(f"--file {file}: has {len(lines):,} lines; at most {MAX_PROMPT_LINES:,} prompts a file")
    prompts = [line.strip() for line in lines]
    if not any(prompts):
        raise CommandError(f"--file {file}: holds no prompts (one prompt per line)")
    empty = [i + 1 for i, line in enumerate(prompts) if not line]
    if empty:
        raise CommandError(f"--file {file}: line {empty[0]} is empty; write one prompt per line "
                           "(an empty prompt would silently give an unconditional image)")
    return prompts


def printable(text: str) -> str:
    """``text`` safe to print to a terminal: control characters (escape sequences that could clear the screen or
    set the title), invisible format characters and line separators are shown as ``\\x1b``, ``\\u200b``, ...;
    everything else (any script, emoji) as it is."""
    import unicodedata

    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif unicodedata.category(ch) == "Cf" and ch in "\u200c\u200d":
            out.append(ch)  # ZWJ / ZWNJ join letters and emoji; harmless
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse a text argument (a prompt, --negative, ...) that is not valid UTF-8 (the shell passed bytes that
    Python could only keep as lone surrogates), naming the argument and the byte; paths may be any bytes."""
    for name, value in vars(args).items():
        if not isinstance(value, str) or name in PATH_ARGUMENTS:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            flag = name.upper() if name == "prompt" else "--" + name.replace("_", "-")
            bad = value[exc.start].encode("utf-8", "surrogateescape")
            raise CommandError(f"{flag}: not valid UTF-8 (byte 0x{bad.hex()} at character {exc.start}); "
                               "give the text in UTF-8") from None


class ResumableImages:
    """``--file``'s images, each written as soon as its batch is drawn into ``.OUT.partial`` beside ``--out``,
    which becomes ``--out`` once every image is there. Interrupted (Ctrl-C, kill -9, an error), the images drawn
    so far stay there, and the same command (same prompts and settings: ``key``) resumes after them; another
    command discards them, saying so."""

    KEY_FILE = "polybridge-generate.json"

    def __init__(self, target: Path, n: int, key: dict[str, Any], overwrite: bool):
        import hashlib
        import shutil
        import sys

        from polybridge.atomic import check_dir_target

        self.target, self.n = check_dir_target(target, overwrite), n
        self.partial = self.target.parent / f".{self.target.name}.partial"
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        key_file = self.partial / self.KEY_FILE
        if self.partial.is_dir() and key_file.is_file() and key_file.read_text().strip() == self.key:
            for leftover in self.partial.glob(".*"):
                leftover.unlink()
            drawn = sum(1 for i in range(n) if self.path(i).is_file())
            print(f"polybridge: resuming: {drawn:,} of {n:,} images are already in {self.partial}", file=sys.stderr)
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)
                print(f"polybridge: removed {self.partial}, an interrupted run of other prompts or settings",
                      file=sys.stderr)
            self.partial.mkdir(parents=True)
            key_file.write_text(self.key + "\n")

    def path(self, i: int) -> Path:
        return self.partial / f"{i:06d}.png"

    def done(self, start: int, count: int) -> bool:
        """Whether images ``start .. start+count-1`` were drawn by an earlier run."""
        return all(self.path(i).is_file() for i in range(start, start + count))

    def put(self, start: int, images: Sequence[Any]) -> None:
        for i, image in enumerate(images, start):
            tmp = self.partial / f".{i:06d}.png.tmp-p{os.getpid()}"
            image.save(tmp, format="PNG")
            os.replace(tmp, self.path(i))

    def __enter__(self) -> ResumableImages:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        import sys

        if kind is not None:
            drawn = sum(1 for i in range(self.n) if self.path(i).is_file())
            print(f"polybridge: {drawn:,} of {self.n:,} images are in {self.partial}; run the same command again to "
                  "draw the rest", file=sys.stderr)

    def publish(self) -> list[str]:
        """Make the complete folder ``--out``; the paths of its images, in line order."""
        from polybridge.atomic import publish_dir

        (self.partial / self.KEY_FILE).unlink()
        publish_dir(self.partial, self.target)
        return [str(self.target / f"{i:06d}.png") for i in range(self.n)]
