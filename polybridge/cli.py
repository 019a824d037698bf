"""The ``polybridge`` command line.

Every command reads the registry (``--registry PATH``, ``$POLYBRIDGE_REGISTRY``, or the nearest
``registry.yaml``). Errors print one line naming the file, key or argument and exit with code 2;
heavy libraries are imported only by the commands that need them. Set ``POLYBRIDGE_DEBUG=1``
to get the full traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from polybridge import __version__
from polybridge.registry import DATA_OBJECTS, Registry, RegistryError, load_registry

EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _registry(args: argparse.Namespace) -> Registry:
    return load_registry(args.registry)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


def _width(text: str) -> int:
    """Columns a string takes in a terminal (CJK characters take two)."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(_width(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[Any]) -> str:
        return "  ".join(str(c) + " " * (w - _width(str(c))) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --------------------------------------------------------------------------- registry


def _entry_summary(entry) -> dict[str, Any]:
    return {
        "code": entry.code,
        "name": entry.name,
        "native_name": entry.native_name,
        "scripts": list(entry.scripts),
        "branch": entry.branch.type if entry.branch else "(backbone)",
        "concepts": list(entry.synthetic.concepts) if entry.synthetic else [],
        "status": entry.status(),
        "fallback": entry.fallback,
    }


def cmd_registry_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    summaries = [_entry_summary(e) for e in reg.languages.values()]
    if args.json:
        _print_json({"registry": str(reg.file), "default_backbone": reg.default_backbone, "languages": summaries})
        return 0
    rows = [[s["code"], s["name"], s["native_name"] or "", ",".join(s["scripts"]), s["branch"],
             s["status"]["tokenizer"], s["status"]["encoder"], s["status"]["branch"], ",".join(s["concepts"])]
            for s in summaries]
    print(f"registry: {reg.file}  (default backbone: {reg.default_backbone})")
    print(_table(rows, ["code", "name", "native", "scripts", "branch", "tokenizer", "encoder", "weights", "concepts"]))
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    import dataclasses

    entry = _registry(args).language(args.code)
    data = dataclasses.asdict(entry)
    data["status"] = entry.status()
    if args.json:
        _print_json(data)
    else:
        import yaml

        print(f"# {entry.file}")
        print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), allow_unicode=True, sort_keys=False).rstrip())
    return 0


def cmd_registry_validate(args: argparse.Namespace) -> int:
    from polybridge.synthetic.captions import load_grammars

    reg = _registry(args)
    grammars = load_grammars(reg)
    report = {code: {"entry": "ok", "grammar": "ok" if code in grammars else "none", **entry.status()}
              for code, entry in reg.languages.items()}
    if args.json:
        _print_json({"registry": str(reg.file), "valid": True, "languages": report})
    else:
        print(f"{reg.file}: valid ({len(reg.languages)} languages, {len(reg.backbones)} backbones)")
        rows = [[c, r["entry"], r["grammar"], r["tokenizer"], r["encoder"], r["branch"]] for c, r in report.items()]
        print(_table(rows, ["code", "entry", "grammar", "tokenizer", "encoder", "weights"]))
    return 0


def cmd_registry_add(args: argparse.Namespace) -> int:
    from polybridge.scaffold import add_language

    reg = _registry(args)
    folder = add_language(reg, args.code, name=args.name, native_name=args.native_name, scripts=args.scripts,
                          branch_type=args.branch, concepts=args.concepts)
    print(f"added {args.code!r}: {folder}")
    print(f"next: edit {folder / 'language.yaml'} and {folder / 'grammar.yaml'}, then "
          f"`polybridge registry validate` and `polybridge tokenizer build --lang {args.code}`")
    return 0


# --------------------------------------------------------------------------- synth


def cmd_synth_render(args: argparse.Namespace) -> int:
    from polybridge.synthetic.captions import Captioner
    from polybridge.synthetic.dataset import render_to_dir

    reg = _registry(args)
    langs = [args.lang, *(args.mix or [])]
    for code in langs:
        reg.language(code)  # unknown code: RegistryError listing the valid ones
    captioner = Captioner(reg, langs)
    out = render_to_dir(args.out, n=args.n, seed=args.seed, split=args.split, size=args.size, lang=args.lang,
                        captioner=captioner.for_languages(langs), overwrite=args.overwrite)
    if args.json:
        _print_json({"out": str(out), "n": args.n, "seed": args.seed, "split": args.split, "lang": langs})
    else:
        print(f"wrote {args.n} scenes to {out} (images + scenes.jsonl)")
    return 0


def cmd_synth_score(args: argparse.Namespace) -> int:
    from polybridge.synthetic.scorer import SceneScorer, load_default_scorer

    scorer = SceneScorer.from_pretrained(args.scorer) if args.scorer else load_default_scorer()
    result = scorer.score_dir(args.dir)
    if args.json:
        _print_json({"dir": str(args.dir), "accuracy": result})
        return 0
    print(f"{args.dir}: {result['n_images']} images, {result['n_objects']} objects")
    acc = result
    rows = [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in acc.items() if not isinstance(v, dict)]
    print(_table(rows, ["attribute", "accuracy"]))
    return 0


# --------------------------------------------------------------------------- generate


def _read_prompt_file(path: str) -> list[str]:
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


def _target_words(span: Any) -> str:
    if span.target == "backbone":
        return "backbone text encoder"
    if span.target == "branch":
        return f"{span.language} branch" + ("" if span.trained else " (untrained: zero branch, no effect)")
    if span.target == "error":
        return f"error: {span.language} has no trained branch and its fallback is 'error'"
    return span.target


def cmd_route(args: argparse.Namespace) -> int:
    from polybridge.router import Router

    if (args.prompt is None) == (args.file is None):
        raise CommandError("give either a PROMPT or --file PROMPTS.txt (not both)")
    reg = _registry(args)
    router = Router.from_registry(reg)
    plans = router.plan_many(_read_prompt_file(args.file) if args.file else [args.prompt])
    if args.json:
        _print_json([p.to_dict() for p in plans] if args.file else plans[0].to_dict())
        return 0
    for i, plan in enumerate(plans):
        if i:
            print()
        print(plan.prompt if plan.prompt.strip() else repr(plan.prompt))
        if not plan.spans:
            print('  no spans (empty prompt): the backbone reads ""')
            continue
        rows = [[s.text, s.language + (f" (detected {s.detected})" if s.detected else ""), f"{s.confidence:.2f}",
                 s.how, _target_words(s)] for s in plan.spans]
        print("\n".join("  " + line for line in _table(rows, ["span", "language", "confidence", "how",
                                                             "goes to"]).splitlines()))
        if plan.is_mixed or len({s.target for s in plan.spans}) > 1:
            print(f"  backbone reads: {plan.backbone_text!r}")
            for code, text in plan.branch_texts.items():
                print(f"  {code} branch reads: {text!r}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import time
    import warnings

    import torch

    from polybridge.atomic import atomic_dir, atomic_write_bytes

    if (args.prompt is None) == (args.file is None):
        raise CommandError("give either a PROMPT or --file PROMPTS.txt (not both)")
    if args.file is not None and args.out is None:
        raise CommandError("--file needs --out DIR (one image per line goes there)")
    if args.file is None and args.output is None:
        raise CommandError("give -o OUT.png for the image grid")
    if args.prompt is not None and not args.prompt.strip():
        raise CommandError("the prompt is empty; say what to draw (use --guidance 0 for unconditional samples)")
    if args.guidance < 0:
        raise CommandError(f"--guidance must be 0 or more, got {args.guidance}")
    reg = _registry(args)
    prompts = _read_prompt_file(args.file) if args.file else [args.prompt] * args.n
    plans = None
    if args.lang is not None:
        needed = [reg.language(args.lang).code]
    else:  # the router decides, prompt by prompt (and span by span)
        from polybridge.router import Router

        router = Router.from_registry(reg)
        plans = router.plan_many(list(dict.fromkeys(prompts)))
        every = plans + router.plan_many([args.negative or ""])
        for plan in every:
            for span in plan.problems():
                raise CommandError(f"{span.text!r} in {plan.prompt!r} is {span.language} ({span.how}), whose branch is "
                                   f"not trained and whose fallback is 'error' ({reg.language(span.language).file}); "
                                   f"train it with `polybridge train --lang {span.language}` or pass --lang")
        needed = list(dict.fromkeys(s.language for p in every for s in p.spans))
        if not args.json:
            for plan in plans[:3]:
                print(f"polybridge: routed {plan.prompt!r}: "
                      + (", ".join(f"{s.language} {s.text!r}" for s in plan.spans) or "no spans"), file=sys.stderr)
            if len(plans) > 3:
                print(f"polybridge: ... and {len(plans) - 3} more prompts (`polybridge route` shows each plan)",
                      file=sys.stderr)
    target = Path(args.out if args.file else args.output)
    from polybridge.atomic import check_writable_parent

    check_writable_parent(target)
    untrained_codes = {}
    for code in needed:
        entry = reg.language(code)
        status = entry.status()
        if entry.branch is not None and status["branch"] != "present" and status["branch"] != "hub":
            untrained_codes[code] = entry.fallback
            print(f"polybridge: {code} has no trained branch yet ({entry.branch_source} is missing); "
                  f"following its fallback '{entry.fallback}'"
                  + (": the zero branch gives the backbone's image for an empty prompt, not your prompt"
                     if entry.fallback == "zero-branch" else ""), file=sys.stderr)
    untrained = bool(untrained_codes)

    from polybridge.pipeline import PolyBridgePipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice above says it once, plainly
        pipe = PolyBridgePipeline.from_registry(reg, languages=needed)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(language=args.lang, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  negative_prompt=args.negative, height=args.size, width=args.size)
    if args.branch_scale is not None:
        kwargs["branch_scale"] = args.branch_scale
    if args.english_prompt and args.lang != reg.backbone().language:  # routed prompts: appended to their English
        kwargs["english_prompt"] = args.english_prompt
    images = []
    from tqdm.auto import tqdm

    batches = range(0, len(prompts), args.batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", disable=len(batches) < 2 or args.json):
        chunk = prompts[start:start + args.batch_size]
        gen = torch.Generator().manual_seed(args.seed + start)
        images.extend(pipe(chunk, generator=gen, **kwargs).images)
    if args.file:
        with atomic_dir(target, overwrite=args.overwrite) as tmp:
            for i, im in enumerate(images):
                im.save(tmp / f"{i:06d}.png")
        written = [str(target / f"{i:06d}.png") for i in range(len(images))]
    else:
        import io

        from diffusers.utils import make_image_grid

        cols = min(len(images), 4)
        rows = -(-len(images) // cols)
        blank = images[0].copy()
        blank.paste((0, 0, 0), (0, 0, blank.width, blank.height))
        grid = make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
        if args.upscale > 1:
            grid = grid.resize((grid.width * args.upscale, grid.height * args.upscale), resample=0)
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        atomic_write_bytes(target, buf.getvalue())
        written = [str(target)]
    record = {"prompts": prompts if args.file else [args.prompt], "n": len(images), "language": args.lang or "auto",
              "trained_branch": not untrained,
              "fallback": (untrained_codes.get(args.lang) if args.lang else untrained_codes) if untrained else None,
              "routes": None if plans is None else [p.to_dict() for p in plans],
              "seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance, "negative_prompt": args.negative,
              "english_prompt": args.english_prompt, "size": images[0].size[0], "backbone": reg.default_backbone,
              "written": written, "seconds": round(time.time() - started, 2)}
    if args.json:
        _print_json(record)
    else:
        print(f"wrote {written[0] if len(written) == 1 else target} ({len(images)} images, {record['seconds']}s)")
    return 0


# --------------------------------------------------------------------------- train


def _branch_options(pairs: list[str]) -> dict[str, Any]:
    """``["hidden_size=768", "bias=true"]`` -> ``{"hidden_size": 768, "bias": True}`` (values read as YAML)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--branch-option {pair!r}: write KEY=VALUE, e.g. hidden_size=768")
        options[key.strip()] = yaml.safe_load(value)
    return options


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from polybridge.training.trainer import TrainOptions, languages_to_train, train_language

    reg = _registry(args)
    if args.all:
        if args.out is not None or args.init_from is not None:
            raise CommandError("--out and --init-from name one branch; use them with --lang, not --all")
        codes = languages_to_train(reg)
        if not codes:
            print("every language with a branch entry already has its weights; nothing to train")
            return 0
    else:
        entry = reg.language(args.lang)
        if entry.branch is None:
            raise CommandError(f"{entry.file}: {args.lang!r} is the backbone's language: it has no branch to train")
        codes = [args.lang]
    if args.work is not None and len(codes) > 1:
        raise CommandError("--work names one run's folder; use it with --lang, not --all")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = TrainOptions(
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup,
        lr_schedule=args.lr_schedule, gradient_accumulation_steps=args.grad_accum, caption_dropout=args.caption_dropout,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing, ema=args.ema,
        checkpoint_every=args.checkpoint_every, seed=args.seed, snr_gamma=args.snr_gamma, num_samples=args.num_samples,
        objects=args.objects,
        branch_type=args.branch_type, branch_options=_branch_options(args.branch_option), backbone=args.backbone,
        work_dir=args.work, out_dir=args.out, init_from=args.init_from, resume=args.resume, overwrite=args.overwrite,
        report_to=args.report_to,
        stop_at=args.stop_at, progress=not args.no_progress, log_data_order=args.log_data_order,
        save_dtype=args.save_dtype,
    )
    results = []
    for code in codes:
        info = train_language(reg, code, options, log=lambda msg: print(msg, file=sys.stderr))
        results.append({k: v for k, v in info.items() if k not in ("losses", "settings")})
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        _print_json(results if args.all else results[0])
    return 0


# --------------------------------------------------------------------------- tokenizer


def cmd_tokenizer_build(args: argparse.Namespace) -> int:
    from polybridge.tokenizer import build_language_tokenizer

    reg = _registry(args)
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
        path = build_language_tokenizer(code, entry.grammar_path, entry.synthetic.concepts, out,
                                        n_captions=args.n_captions, seed=args.seed)
        print(f"{code}: tokenizer written to {path}")
    return 0


# --------------------------------------------------------------------------- bench


def _words(values: Sequence[str] | None) -> list[str]:
    """``--langs zh ja`` and ``--langs zh,ja`` alike."""
    return [w for v in values or () for w in v.replace(",", " ").split()]


def cmd_bench(args: argparse.Namespace) -> int:
    from polybridge.bench.report import check_output, write_report
    from polybridge.bench.runner import METHODS, BenchError, BenchSettings, bench_languages, run_bench
    from polybridge.bench.suites import SUITES

    reg = _registry(args)
    valid_langs = bench_languages(reg)
    langs = _words(args.langs)
    for code in langs:
        if code not in valid_langs:
            why = " is the backbone's language (its prompts are the english-reference method)" \
                if code in reg.languages else " is not a registered language"
            raise CommandError(f"--langs: {code!r}{why}; valid: {', '.join(valid_langs)}")
    methods = _words(args.methods) or list(METHODS)
    for method in methods:
        if method not in METHODS:
            raise CommandError(f"--methods: unknown method {method!r}; valid: {', '.join(METHODS)}")
    suites = _words(args.suites) or ["general", "culture"]
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
    default_out = reg.root / ("runs/bench-quick" if args.quick else "benchmarks/results")
    out = Path(args.out) if args.out else default_out
    try:
        check_output(out, args.overwrite)
    except OSError as exc:
        raise CommandError(f"--out: {exc}") from None
    settings = BenchSettings(languages=tuple(dict.fromkeys(langs)), methods=tuple(dict.fromkeys(methods)),
                             suites=tuple(dict.fromkeys(suites)), quick=args.quick, n=args.n,
                             curated_n=args.curated_n, steps=args.steps, guidance=args.guidance, seed=args.seed,
                             batch_size=args.batch_size, size=args.size, backbone=args.backbone, weights=weights,
                             device=args.device)
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise CommandError(f"--device: {args.device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device: {args.device!r}, but this torch build sees no CUDA device; valid here: cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar for the whole run, not one per model loaded
    try:
        result = run_bench(reg, settings, log=lambda msg: print(f"polybridge: {msg}", file=sys.stderr),
                           progress=not (args.json or args.no_progress))
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    write_report(result, out, overwrite=args.overwrite)
    table = result.table()
    if args.json:
        _print_json({**table, "out": str(out)})
        return 0
    cells = {(c.suite, c.language, c.method): c for c in result.cells}
    for suite in settings.suites:
        metric = "clip_t" if suite == "curated" else "accuracy"
        rows = [[code, *(_fmt_cell(cells[(suite, code, m)], metric) for m in settings.methods)]
                for code in result.settings["languages"]]
        print(f"{suite} ({metric})")
        print(_table(rows, ["language", *settings.methods]))
        print()
    ran = sum(c.status == "ok" for c in result.cells)
    print(f"wrote {out / 'report.md'} and report.html ({ran} of {len(result.cells)} cells ran, "
          f"{len(result.cells) - ran} skipped, reasons in the report) in {result.seconds:.0f} s")
    return 0


def _fmt_cell(cell: Any, metric: str) -> str:
    if cell.status != "ok":
        return "skipped"
    value = cell.metrics.get(metric)
    return "n/a" if value is None or value != value else (f"{value:.1f}" if metric == "clip_t" else f"{value:.3f}")


# --------------------------------------------------------------------------- parser


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

    # registry
    p_reg = sub.add_parser("registry", help="list, show, validate and add languages",
                           description="The language registry: registry.yaml plus languages/<code>/language.yaml.")
    reg_sub = p_reg.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    p = reg_sub.add_parser("list", help="one line per registered language, with what is built")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_registry_list)
    p = reg_sub.add_parser("show", help="one language's whole entry")
    p.add_argument("code", help="language code, e.g. zh")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=cmd_registry_show)
    p = reg_sub.add_parser("validate", help="parse every entry and grammar; exit 2 naming the first problem")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_registry_validate)
    p = reg_sub.add_parser("add", help="scaffold languages/CODE/ from a commented template that validates as written",
                           description="Create languages/CODE/language.yaml and grammar.yaml from templates and "
                                       "register CODE in registry.yaml. Nothing is written if anything fails.")
    p.add_argument("code", help="ISO 639 code of the new language, e.g. pt or pt-BR")
    p.add_argument("--name", required=True, help="English name, e.g. Portuguese")
    p.add_argument("--native-name", default=None, help="the language's own name for itself, e.g. Português")
    p.add_argument("--scripts", nargs="+", default=["Latin"], metavar="SCRIPT",
                   help="Unicode scripts it is written in (default: Latin)")
    p.add_argument("--branch", default="bdm", help="branch type: bdm or pea (default: bdm)")
    p.add_argument("--concepts", nargs="*", default=[], metavar="CONCEPT",
                   help="culture-specific concepts of the synthetic world that this language owns")
    p.set_defaults(func=cmd_registry_add)

    # synth
    p_syn = sub.add_parser("synth", help="render and score the synthetic world",
                           description="The synthetic world: seeded scenes with captions in every registered language.")
    syn_sub = p_syn.add_subparsers(dest="synth_command", metavar="ACTION", required=True)
    p = syn_sub.add_parser("render", help="write N scenes as PNGs plus scenes.jsonl (captions and ground truth)",
                           description="Render N seeded scenes into DIR: 000000.png, ... and scenes.jsonl. "
                                       "The folder appears whole or not at all.")
    p.add_argument("--lang", required=True, help="caption language code (see `polybridge registry list`)")
    p.add_argument("--mix", nargs="+", metavar="LANG", default=None,
                   help="caption two-object scenes with object 2 in LANG (mixed-language prompts)")
    p.add_argument("-n", type=_positive_int, required=True, help="number of scenes (at least 1)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0); same seed, same scenes")
    p.add_argument("--split", choices=["train", "validation", "test"], default="test",
                   help="which split's stream to sample (default test; train never holds the held-out combinations)")
    p.add_argument("--size", type=_positive_int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="print what was run as JSON")
    p.set_defaults(func=cmd_synth_render)
    p = syn_sub.add_parser("score", help="score the images in DIR against its scenes.jsonl with the ground-truth scorer")
    p.add_argument("dir", help="folder with scenes.jsonl and the PNGs it names")
    p.add_argument("--scorer", default=None, help="scorer folder (default: the committed one)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_synth_score)

    # generate
    p = sub.add_parser("generate", help="draw images from a prompt (or a file of prompts) in any registered language",
                       description="Generate with the backbone plus the language's branch. One prompt: an image "
                                   "grid of -n images (-o OUT.png). --file: one image per line into --out DIR "
                                   "(000000.png, 000001.png, ... in line order), batched.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (omit with --file)")
    p.add_argument("--lang", default=None, help="the prompt's language code (see `polybridge registry list`); "
                                                "default: the router decides per prompt (see `polybridge route`)")
    p.add_argument("-n", type=_positive_int, default=4, help="images for a single prompt (default 4)")
    p.add_argument("-o", "--output", default=None, help="image grid to write (PNG)")
    p.add_argument("--file", default=None, help="a UTF-8 file with one prompt per line")
    p.add_argument("--out", default=None, help="folder for --file's images (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0); batch k uses seed + its first index")
    p.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--negative", default=None, help="negative prompt (same language as the prompt)")
    p.add_argument("--english-prompt", default="", help="English text for the backbone beside a native prompt (default \"\")")
    p.add_argument("--branch-scale", type=float, default=None, help="scale of the branch (default: the entry's)")
    p.add_argument("--size", type=_positive_int, default=None, help="image side in pixels (default: the backbone's)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--upscale", type=_positive_int, default=4, help="enlarge the grid by this factor, nearest-neighbour (default 4)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print what was run as JSON")
    p.set_defaults(func=cmd_generate)

    # route
    p = sub.add_parser("route", help="show how prompts are routed: language spans, confidence, which branch",
                       description="Split each prompt into language spans (Unicode-script rules, then lingua for "
                                   "Latin-script text) and show each span's language, confidence, how it was "
                                   "decided and where it goes (the backbone's text encoder or a language's branch), "
                                   "with the registry's fallbacks applied. `polybridge generate` without --lang "
                                   "routes the same way.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (omit with --file)")
    p.add_argument("--file", default=None, help="a UTF-8 file with one prompt per line")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (a list of plans with --file)")
    p.set_defaults(func=cmd_route)

    # tokenizer
    p_tok = sub.add_parser("tokenizer", help="build per-language sentencepiece tokenizers")
    tok_sub = p_tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tok_sub.add_parser("build", help="train a language's tokenizer on its synthetic captions",
                           description="Train a sentencepiece tokenizer on synthetic captions and save it where "
                                       "the language's entry points (encoder.tokenizer), loadable by AutoTokenizer.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--lang", help="language code")
    group.add_argument("--all", action="store_true", help="every registered language")
    p.add_argument("--n-captions", type=_positive_int, default=20000, help="captions to train on (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=cmd_tokenizer_build)

    # train
    p = sub.add_parser("train", help="train a language's branch from its registry entry (bdm or pea)",
                       description="Train the branch of a language as its registry entry says (encoder, branch type, "
                                   "data, branch.training hyperparameters); flags override the entry. The branch is "
                                   "written where branch.weights points, atomically, when training ends. Runs as it "
                                   "is on one device or under `accelerate launch -m polybridge.cli train ...` "
                                   "(configs in scripts/accelerate/). Checkpoints go to --work; --resume continues "
                                   "after a kill with the same batches.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--lang", help="language code (see `polybridge registry list`)")
    group.add_argument("--all", action="store_true", help="every language whose branch weights do not exist yet")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (entry: branch.training.max_steps)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="global batch per optimizer step, all processes together (entry: batch_size)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (entry: learning_rate)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (entry: warmup_steps)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None, help="(entry: lr_schedule)")
    p.add_argument("--grad-accum", type=_positive_int, default=None,
                   help="gradient accumulation steps (entry: gradient_accumulation_steps)")
    p.add_argument("--caption-dropout", type=float, default=None, help="share of empty captions (entry: caption_dropout)")
    p.add_argument("--snr-gamma", type=float, default=None,
                   help="min-SNR-gamma weighting of the denoising loss, e.g. 5.0 (entry: snr_gamma; null: plain MSE)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="(entry: mixed_precision; fp16 falls back to fp32 on a CPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (entry: gradient_checkpointing)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="keep and write an EMA of the weights (entry: ema, ema_decay)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, help="(entry: checkpoint_every)")
    p.add_argument("--seed", type=int, default=None, help="seed of the data, noise and init (entry: seed)")
    p.add_argument("--num-samples", type=_positive_int, default=None, help="training examples (entry: data.num_samples)")
    p.add_argument("--objects", choices=DATA_OBJECTS, default=None,
                   help="synthetic data: scenes draw every object (all; another language's concept is an unnamed "
                        "'object') or the generic shapes plus the language's own concepts (own) (entry: data.objects)")
    p.add_argument("--branch-type", default=None, help="train another branch type than the entry's (bdm, pea); "
                                                       "give --out too")
    p.add_argument("--branch-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a branch option, over the entry's branch.options (which apply to the entry's own type "
                        "only); repeatable, e.g. --branch-option hidden_size=768 (pea: hidden_size, num_layers, bias)")
    p.add_argument("--backbone", default=None, help="backbone name in registry.yaml (default: default_backbone)")
    p.add_argument("--out", type=Path, default=None, help="where the branch goes (default: the entry's branch.weights)")
    p.add_argument("--work", type=Path, default=None,
                   help="checkpoints, encodings cache and train_info.json (default: runs/train/CODE-TYPE next to "
                        "registry.yaml)")
    p.add_argument("--init-from", type=Path, default=None, help="start from this saved branch instead of a fresh one")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing branch weights when training ends; without --resume, drop an old checkpoint")
    p.add_argument("--stop-at", type=_positive_int, default=None,
                   help="end at this step on the full schedule and write the branch (resumable to max_steps)")
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype the written branch is stored in (float16 halves the file; it loads as float32)")
    p.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                   help="accelerate tracker (default none; tensorboard logs go to WORK/logs)")
    p.add_argument("--log-data-order", action="store_true",
                   help="write WORK/data_order/rankN.json: the examples each process saw per step")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--json", action="store_true", help="print what was trained as JSON")
    p.set_defaults(func=cmd_train)

    # bench
    p = sub.add_parser("bench", help="benchmark every language x method on the same prompts; writes report.md/.html",
                       description="Run the benchmark suites (general and culture-specific synthetic prompts with "
                                   "ground truth; --suites curated adds the hand-written MC-18-style prompts) for "
                                   "each language with each method (english-reference, translate, naive-swap, bdm, "
                                   "pea) on the same prompts, seeds and steps, and write report.md, a self-contained "
                                   "report.html, results.json, image grids and bar plots to --out. A language or "
                                   "method without what it needs (encoder, branch weights, grammar) is skipped and "
                                   "the report says why.")
    p.add_argument("--langs", nargs="+", metavar="LANG", default=None,
                   help="languages (default: every native language); `zh ja` or `zh,ja`")
    p.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                   help="english-reference, translate, naive-swap, bdm, pea (default: all)")
    p.add_argument("--suites", nargs="+", metavar="SUITE", default=None,
                   help="general, culture, curated (default: general culture)")
    p.add_argument("--quick", action="store_true", help="8 prompts per synthetic suite, 6 curated, 10 steps "
                                                        "(a few minutes on a CPU)")
    p.add_argument("-n", type=_positive_int, default=None,
                   help="prompts per synthetic suite (default: the entry's benchmark.synthetic_prompts)")
    p.add_argument("--curated-n", type=_positive_int, default=None, help="prompts per curated suite (default: all)")
    p.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default 25, --quick 10)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0); scenes use each entry's seed")
    p.add_argument("--batch-size", type=_positive_int, default=50, help="prompts per batch (default 50)")
    p.add_argument("--size", type=_positive_int, default=None, help="image side in pixels (default: the backbone's)")
    p.add_argument("--backbone", default=None, help="backbone name in registry.yaml (default: default_backbone)")
    p.add_argument("--weights", nargs="+", metavar="CODE:METHOD=DIR", default=None,
                   help="a branch not named by the entry, e.g. zh:pea=runs/zh-pea")
    p.add_argument("--out", default=None, help="report folder (default: benchmarks/results, --quick: runs/bench-quick)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--device", default="cpu", help="torch device for generation, e.g. cuda (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the table (every cell's metrics or reason) as JSON")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (RegistryError, CommandError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("POLYBRIDGE_DEBUG"):
            raise
        print(f"polybridge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("polybridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
