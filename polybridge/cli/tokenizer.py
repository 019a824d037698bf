"""``polybridge tokenizer``: build per-language sentencepiece tokenizers."""

from __future__ import annotations

import argparse
from typing import Any

from polybridge.atomic import check_replaceable
from polybridge.cli.common import CommandError, positive_int, registry_of


def cmd_tokenizer_build(args: argparse.Namespace) -> int:
    from polybridge.tokenizer import build_language_tokenizer

    reg = registry_of(args)
    codes = list(reg.codes) if args.all else [reg.language(args.lang).code]
    for code in codes:
        entry = reg.language(code)
        if entry.synthetic is None:
            raise CommandError(f"{entry.file}: synthetic: {code!r} has no grammar to train a tokenizer on")
        # The backbone's language has no native encoder; its tokenizer serves the world's own CLIP.
        out = entry.tokenizer_source if entry.encoder is not None else entry.folder / "tokenizer"
        if isinstance(out, str):
            raise CommandError(f"{entry.file}: encoder.tokenizer: {out!r} is a hub id; "
                               "set a local path (./tokenizer) to build one here")
        check_replaceable(out, entry.folder, f"{entry.file}: encoder.tokenizer")
        path = build_language_tokenizer(code, entry.grammar_path, entry.synthetic.concepts, out,
                                        n_captions=args.n_captions, seed=args.seed)
        print(f"{code}: tokenizer written to {path}")
    return 0


def add_commands(sub: Any) -> None:
    """``tokenizer build``."""
    p_tok = sub.add_parser("tokenizer", help="build per-language sentencepiece tokenizers")
    tok_sub = p_tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tok_sub.add_parser("build", help="train a language's tokenizer on its synthetic captions",
                           description="Train a sentencepiece tokenizer on synthetic captions and save it where "
                                       "the language's entry points (encoder.tokenizer), loadable by AutoTokenizer.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--lang", help="language code")
    group.add_argument("--all", action="store_true", help="every registered language")
    p.add_argument("--n-captions", type=positive_int, default=20000, help="captions to train on (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=cmd_tokenizer_build)
