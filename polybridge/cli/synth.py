"""``polybridge synth``: render and score the synthetic world."""

from __future__ import annotations

import argparse
from typing import Any

from polybridge import limits
from polybridge.cli.common import int_upto, print_json, registry_of, table


def cmd_synth_render(args: argparse.Namespace) -> int:
    from polybridge.synthetic.captions import Captioner
    from polybridge.synthetic.dataset import render_to_dir

    reg = registry_of(args)
    langs = [args.lang, *(args.mix or [])]
    for code in langs:
        reg.language(code)  # unknown code: RegistryError listing the valid ones
    captioner = Captioner(reg, langs)
    out = render_to_dir(args.out, n=args.n, seed=args.seed, split=args.split, size=args.size, lang=args.lang,
                        captioner=captioner.for_languages(langs), overwrite=args.overwrite)
    if args.json:
        print_json({"out": str(out), "n": args.n, "seed": args.seed, "split": args.split, "lang": langs})
    else:
        print(f"wrote {args.n} scenes to {out} (images + scenes.jsonl)")
    return 0


def cmd_synth_score(args: argparse.Namespace) -> int:
    from polybridge.synthetic.scorer import SceneScorer, load_default_scorer

    scorer = SceneScorer.from_pretrained(args.scorer) if args.scorer else load_default_scorer()
    result = scorer.score_dir(args.dir)
    if args.json:
        print_json({"dir": str(args.dir), "accuracy": result})
        return 0
    print(f"{args.dir}: {result['n_images']} images, {result['n_objects']} objects")
    acc = result
    rows = [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in acc.items() if not isinstance(v, dict)]
    print(table(rows, ["attribute", "accuracy"]))
    return 0


def add_commands(sub: Any) -> None:
    """``synth render|score``."""
    p_syn = sub.add_parser("synth", help="render and score the synthetic world",
                           description="The synthetic world: seeded scenes with captions in every registered language.")
    syn_sub = p_syn.add_subparsers(dest="synth_command", metavar="ACTION", required=True)
    p = syn_sub.add_parser("render", help="write N scenes as PNGs plus scenes.jsonl (captions and ground truth)",
                           description="Render N seeded scenes into DIR: 000000.png, ... and scenes.jsonl. "
                                       "The folder appears whole or not at all.")
    p.add_argument("--lang", required=True, help="caption language code (see `polybridge registry list`)")
    p.add_argument("--mix", nargs="+", metavar="LANG", default=None,
                   help="caption two-object scenes with object 2 in LANG (mixed-language prompts)")
    p.add_argument("-n", type=int_upto(limits.MAX_NUM_SAMPLES), required=True, help="number of scenes (at least 1)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0); same seed, same scenes")
    p.add_argument("--split", choices=["train", "validation", "test"], default="test",
                   help="which split's stream to sample (default test; train never holds the held-out combinations)")
    p.add_argument("--size", type=int_upto(limits.MAX_RENDER_SIZE), default=32,
                   help="image side in pixels (default 32)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="print what was run as JSON")
    p.set_defaults(func=cmd_synth_render)
    p = syn_sub.add_parser("score", help="score the images in DIR against its scenes.jsonl with the ground-truth scorer")
    p.add_argument("dir", help="folder with scenes.jsonl and the PNGs it names")
    p.add_argument("--scorer", default=None, help="scorer folder (default: the committed one)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_synth_score)
