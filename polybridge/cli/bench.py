"""``polybridge bench``: every language x method on the same prompts; report.md / report.html."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from polybridge import limits
from polybridge.cli.common import CommandError, float_in, int_upto, positive_int, print_json, registry_of, table, words


def cmd_bench(args: argparse.Namespace) -> int:
    from polybridge.bench.report import check_output, write_report
    from polybridge.bench.runner import BenchError, run_bench

    reg = registry_of(args)
    settings = _settings(args, reg)
    default_out = reg.root / ("runs/bench-quick" if args.quick else "benchmarks/results")
    out = Path(args.out) if args.out else default_out
    try:
        check_output(out, args.overwrite)
    except OSError as exc:
        raise CommandError(f"--out: {exc}") from None
    _check_device(args)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar for the whole run, not one per model loaded
    try:
        result = run_bench(reg, settings, log=lambda msg: print(f"polybridge: {msg}", file=sys.stderr),
                           progress=not (args.json or args.no_progress))
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    write_report(result, out, overwrite=args.overwrite)
    if args.json:
        print_json({**result.table(), "out": str(out)})
        return 0
    _print_tables(result, settings)
    ran = sum(c.status == "ok" for c in result.cells)
    print(f"wrote {out / 'report.md'} and report.html ({ran} of {len(result.cells)} cells ran, "
          f"{len(result.cells) - ran} skipped, reasons in the report) in {result.seconds:.0f} s")
    return 0


def _settings(args: argparse.Namespace, reg: Any) -> Any:
    """The run's :class:`~polybridge.bench.runner.BenchSettings`, every language, method, suite and weights
    folder checked against what exists (the error lists the valid ones)."""
    from polybridge.bench.runner import METHODS, BenchSettings, bench_languages
    from polybridge.bench.suites import DEFAULT_SUITES, SUITES

    valid_langs = bench_languages(reg)
    langs = words(args.langs)
    for code in langs:
        if code not in valid_langs:
            why = " is the backbone's language (its prompts are the english-reference method)" \
                if code in reg.languages else " is not a registered language"
            raise CommandError(f"--langs: {code!r}{why}; valid: {', '.join(valid_langs)}")
    methods = words(args.methods) or list(METHODS)
    for method in methods:
        if method not in METHODS:
            raise CommandError(f"--methods: unknown method {method!r}; valid: {', '.join(METHODS)}")
    suites = words(args.suites) or list(DEFAULT_SUITES)
    for suite in suites:
        if suite not in SUITES:
            raise CommandError(f"--suites: unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    weights = {}
    for item in args.weights or ():
        key, sep, path = item.partition("=")
        code, colon, method = key.partition(":")
        if not sep or not colon or not path:
            raise CommandError(f"--weights: {item!r} is not CODE:METHOD=DIR (e.g. zh:pea=runs/zh-pea)")
        weights[(code, method)] = path
    return BenchSettings(languages=tuple(dict.fromkeys(langs)), methods=tuple(dict.fromkeys(methods)),
                         suites=tuple(dict.fromkeys(suites)), quick=args.quick, n=args.n,
                         curated_n=args.curated_n, steps=args.steps, guidance=args.guidance, seed=args.seed,
                         batch_size=args.batch_size, size=args.size, backbone=args.backbone, weights=weights,
                         device=args.device)


def _check_device(args: argparse.Namespace) -> None:
    """Refuse a ``--device`` this machine does not have, before any model is loaded; apply ``--threads``."""
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise CommandError(f"--device: {args.device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device: {args.device!r}, but this torch build sees no CUDA device; valid here: cpu")
    if args.threads:
        torch.set_num_threads(args.threads)


def _print_tables(result: Any, settings: Any) -> None:
    """One table per suite: a row per language, a column per method (accuracy; CLIP-T for curated); the plugins
    suite: a row per language x method, a column per plugin row (compatibility)."""
    from polybridge.bench.plugins import PLUGIN_SUITE

    cells = {(c.suite, c.language, c.method): c for c in result.cells if c.plugin is None}
    for suite in settings.suites:
        if suite == PLUGIN_SUITE:
            _print_plugins(result)
            continue
        metric = "clip_t" if suite == "curated" else "accuracy"
        rows = [[code, *(_fmt_cell(cells[(suite, code, m)], metric) for m in settings.methods)]
                for code in result.settings["languages"]]
        print(f"{suite} ({metric})")
        print(table(rows, ["language", *settings.methods]))
        print()


def _print_plugins(result: Any) -> None:
    from polybridge.bench.report import plugin_table

    header, rows = plugin_table(result, "compatibility")
    print("plugins (compatibility = native joint / English joint; the English row: its joint rate)")
    print(table(rows, header) if rows else "no plugin cell ran (the reasons are in the report)")
    print()


def _fmt_cell(cell: Any, metric: str) -> str:
    if cell.status != "ok":
        return "skipped"
    value = cell.metrics.get(metric)
    return "n/a" if value is None or value != value else (f"{value:.1f}" if metric == "clip_t" else f"{value:.3f}")


def add_commands(sub: Any) -> None:
    """``bench``."""
    p = sub.add_parser("bench", help="benchmark every language x method on the same prompts; writes report.md/.html",
                       description="Run the benchmark suites (general and culture-specific synthetic prompts with "
                                   "ground truth; --suites curated adds the hand-written MC-18-style prompts) for "
                                   "each language with each method (english-reference, translate, naive-swap, bdm, "
                                   "pea) on the same prompts, seeds and steps, and the plugins suite (each toy "
                                   "plugin and scheduler swap, English prompts against each trained branch's native "
                                   "ones: compatibility), and write report.md, a self-contained "
                                   "report.html, results.json, image grids and bar plots to --out. A language or "
                                   "method without what it needs (encoder, branch weights, grammar) is skipped and "
                                   "the report says why.")
    p.add_argument("--langs", nargs="+", metavar="LANG", default=None,
                   help="languages (default: every native language); `zh ja` or `zh,ja`")
    p.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                   help="english-reference, translate, naive-swap, bdm, pea (default: all)")
    p.add_argument("--suites", nargs="+", metavar="SUITE", default=None,
                   help="general, culture, curated, plugins (default: general culture plugins)")
    p.add_argument("--quick", action="store_true", help="8 prompts per synthetic suite, 6 curated, 4 scenes per "
                                                        "plugin row, 10 steps (a few minutes on a CPU)")
    p.add_argument("-n", type=positive_int, default=None,
                   help="prompts per synthetic suite and scenes per plugin row (default: the entry's "
                        "benchmark.synthetic_prompts; plugins: 16)")
    p.add_argument("--curated-n", type=positive_int, default=None, help="prompts per curated suite (default: all)")
    p.add_argument("--steps", type=int_upto(limits.MAX_INFERENCE_STEPS), default=None,
                   help="denoising steps (default 25, --quick 10)")
    p.add_argument("--guidance", type=float_in(0, limits.MAX_GUIDANCE), default=7.5,
                   help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0); scenes use each entry's seed")
    p.add_argument("--batch-size", type=int_upto(limits.MAX_BATCH_SIZE), default=50,
                   help="prompts per batch (default 50)")
    p.add_argument("--size", type=int_upto(limits.MAX_IMAGE_SIZE), default=None,
                   help="image side in pixels (default: the backbone's)")
    p.add_argument("--backbone", default=None, help="backbone name in registry.yaml (default: default_backbone)")
    p.add_argument("--weights", nargs="+", metavar="CODE:METHOD=DIR", default=None,
                   help="a branch not named by the entry, e.g. zh:pea=runs/zh-pea")
    p.add_argument("--out", default=None, help="report folder (default: benchmarks/results, --quick: runs/bench-quick)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--device", default="cpu", help="torch device for generation, e.g. cuda (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the table (every cell's metrics or reason) as JSON")
    p.set_defaults(func=cmd_bench)
