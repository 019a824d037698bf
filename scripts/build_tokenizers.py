#!/usr/bin/env python
"""Build every language's sentencepiece tokenizer from its synthetic captions: languages/<code>/tokenizer/.

Each language folder with a grammar.yaml gets one (English too: the synthetic world's own small
CLIP reads English captions with it; the backbone's CLIP tokenizer is a separate thing). The
concepts a language owns come from its language.yaml (``synthetic.concepts``), or, where there is
none yet, from the grammar itself. Writes are atomic: a failed build leaves the old folder.

    python scripts/build_tokenizers.py                   # all languages
    python scripts/build_tokenizers.py --langs zh ja     # some
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from polybridge.synthetic.grammar import GrammarError, grammar_concepts  # noqa: E402
from polybridge.tokenizer import DEFAULT_VOCAB_SIZE, build_language_tokenizer, tokenizer_info  # noqa: E402


def language_concepts(folder: Path) -> tuple[str, ...]:
    """``synthetic.concepts`` from ``folder/language.yaml`` if it says, else the concepts the grammar names."""
    entry = folder / "language.yaml"
    if entry.is_file():
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        synthetic = data.get("synthetic") if isinstance(data, dict) else None
        if isinstance(synthetic, dict) and "concepts" in synthetic:
            return tuple(synthetic["concepts"] or ())
    return grammar_concepts(folder / "grammar.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--languages-dir", type=Path, default=REPO / "languages",
                        help="folder holding one folder per language (default: %(default)s)")
    parser.add_argument("--langs", nargs="+", metavar="CODE", help="only these language codes (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="scene, caption and training seed (default: %(default)s)")
    parser.add_argument("--n-captions", type=int, default=20000,
                        help="captions to train each tokenizer on (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="upper bound on pieces, bytes and specials included (default: %(default)s)")
    args = parser.parse_args(argv)

    found = {p.parent.name: p.parent for p in sorted(args.languages_dir.glob("*/grammar.yaml"))}
    if not found:
        parser.error(f"no */grammar.yaml under {args.languages_dir}")
    codes = args.langs or list(found)
    unknown = [c for c in codes if c not in found]
    if unknown:
        parser.error(f"no grammar for {', '.join(unknown)}; languages with one: {', '.join(found)}")
    if args.n_captions < 1:
        parser.error("--n-captions must be at least 1")

    for code in codes:
        folder = found[code]
        start = time.perf_counter()
        try:
            out = build_language_tokenizer(code, folder / "grammar.yaml", language_concepts(folder),
                                           folder / "tokenizer", n_captions=args.n_captions, seed=args.seed,
                                           vocab_size=args.vocab_size)
        except GrammarError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        size = sum(f.stat().st_size for f in out.iterdir()) / 1024
        vocab = tokenizer_info(out).get("vocab_size")
        print(f"{code}: {vocab} pieces, {size:.0f} KiB, {time.perf_counter() - start:.1f} s -> "
              f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
