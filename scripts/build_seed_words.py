#!/usr/bin/env python
"""Write each language's seed-word list (languages/<code>/seed_words.txt) from the project's own sources.

Seed words are frequent words of a language's prompts that the router has lingua score when it loads, so that
routing rarely waits for lingua (~45 us a new word); they change how fast prompts route, never where. A
language's list is the file its entry names as detection.seed_words, made from, in this order:

  - prompt_words.txt in its folder, when there is one: frequent prompt words written by hand (en, es, fr, de);
  - its caption grammar (synthetic.grammar): every word the grammar may write.

Words are read as the router reads prompts (NFC, lowercase, letters), each once; the same sources always give
the same file (no randomness, no clock). `polybridge registry add` writes a new language's first list from its
starter grammar: run this again once the grammar is translated.

    python scripts/build_seed_words.py --all               # every language whose entry names a list
    python scripts/build_seed_words.py --langs it          # some
    python scripts/build_seed_words.py --all --check       # exit 1 if a written list differs from its sources
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--langs", nargs="+", metavar="CODE", help="these language codes")
    which.add_argument("--all", action="store_true", help="every registered language whose entry names a list")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; say which lists differ from what their sources make (exit 1 if any)")
    parser.add_argument("--registry", default=None, help="registry.yaml or its folder (default: the repository's)")
    args = parser.parse_args(argv)

    from polybridge.atomic import atomic_write_text
    from polybridge.errors import PolyBridgeError
    from polybridge.registry import (RegistryError, RegistrySpec, find_registry, load_language, parse_dataclass,
                                     read_yaml)
    from polybridge.seed_words import entry_seed_words
    from polybridge.synthetic.grammar import GrammarError

    try:
        # The entries without the lists they name: a list that is missing or broken is what this script mends.
        file = find_registry(args.registry or REPO)
        codes = parse_dataclass(RegistrySpec, read_yaml(file), file).languages
        entries = {c: load_language(file.parent / "languages" / c, c, word_lists=False) for c in codes}
        unknown = [c for c in args.langs or () if c not in entries]
        if unknown:
            raise RegistryError(file, "languages", f"{', '.join(unknown)} not registered", valid=entries)
        chosen = args.langs or [c for c, e in entries.items() if e.detection.seed_words is not None]
        stale = []
        for code in chosen:
            path, text = entry_seed_words(entries[code])
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            words = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            if args.check:
                same = path.is_file() and path.read_text(encoding="utf-8") == text
                stale += [] if same else [code]
                print(f"{code}: {shown} {'is up to date' if same else 'differs from its sources'} ({words:,} words)")
            else:
                atomic_write_text(path, text)
                print(f"{code}: {words:,} words -> {shown}")
    except (PolyBridgeError, RegistryError, GrammarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if stale:
        print(f"run `python scripts/build_seed_words.py --langs {' '.join(stale)}` to write them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
