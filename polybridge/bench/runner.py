"""Running the benchmark: every requested language x suite x method on the same prompts, seeds and steps.

Methods (:data:`METHODS`), all on the one frozen backbone:

- ``english-reference``: the backbone given the English caption of the same scene (curated: the English
  translation). The upper bound for what English can say; on the culture suite it cannot name the concept.
- ``translate``: the backbone given the word-by-word dictionary translation of the native prompt
  (:mod:`polybridge.bench.translate`); culture words come out as English words the backbone never learned.
  Synthetic suites only (the dictionary covers the synthetic world).
- ``naive-swap``: the native encoder's token states fed straight into the backbone's cross-attention through an
  untrained size-matching projection (a one-layer ``pea`` adapter, LayerNorm then a Linear from the native width
  to the backbone's, seeded per language): what swapping the text encoder without a bridge gives.
- ``bdm`` / ``pea``: the trained branch. A language's entry names one branch type and its weights; a branch of
  the other type trained elsewhere is passed with ``weights={(code, type): path}`` (``--weights``). Missing
  weights: the cell is skipped, with the reason.

Every cell of a language uses the same suite, the same generation seed (one generator per batch, seeded
``seed + first index``, :func:`polybridge.eval.attributes.generate`), the same steps and guidance, so the
methods differ only in what conditions the backbone. Nothing fails the whole run that concerns one
language or method: a missing encoder, branch, grammar, prompt file or CLIP model skips those cells and
the report says why. A missing backbone is an error (nothing could run).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import polybridge
from polybridge.bench.plugins import (
    PLUGIN_SEED,
    PLUGIN_SPLIT,
    PLUGIN_SUITE,
    run_plugins,
)
from polybridge.bench.plugins import cell_count as plugin_cell_count
from polybridge.bench.suites import (
    DEFAULT_SUITES,
    SUITES,
    Suite,
    SuiteError,
    curated_suite,
    synthetic_suite,
    synthetic_unavailable,
)
from polybridge.branches import load_branch
from polybridge.errors import PolyBridgeError
from polybridge.registry import LanguageEntry, Registry

#: Methods, in report order.
METHODS: tuple[str, ...] = ("english-reference", "translate", "naive-swap", "bdm", "pea")
BRANCH_METHODS: tuple[str, ...] = ("bdm", "pea")
NATIVE_METHODS: tuple[str, ...] = ("naive-swap", *BRANCH_METHODS)

METHOD_HELP: dict[str, str] = {
    "english-reference": "the backbone given the English caption of the same scene (the upper bound)",
    "translate": "the backbone given a word-by-word dictionary translation of the native prompt",
    "naive-swap": "native encoder states fed straight to the backbone through an untrained projection",
    "bdm": "the trained bdm branch (ControlNet-like residuals), backbone reads \"\"",
    "pea": "the trained pea branch (MLP adapter replacing the backbone's context)",
}

#: Settings of a full run and of ``--quick`` (prompts per synthetic suite, per curated suite, denoising steps).
#: The plugins suite's scenes per row (``plugin_n``): 16 x 10 rows x 12 sides (English, 9 bdm, 2 pea) at 25 steps is
#: about 15 min on this 2-core CPU beside other jobs (measured 3.5 img/s English, 2.3 bdm, one thread).
FULL = {"n": None, "curated_n": None, "plugin_n": 16, "steps": 25}
QUICK = {"n": 8, "curated_n": 6, "plugin_n": 4, "steps": 10}


class BenchError(PolyBridgeError, ValueError):
    """A bad request: unknown language, method or suite, or a bad setting. The message lists what is valid."""


@dataclass(frozen=True)
class BenchSettings:
    """What to run. Empty ``languages``: every native language of the registry. ``n``: prompts per synthetic
    suite (default: each entry's ``benchmark.synthetic_prompts``; ``quick``: 8) and scenes per row of the plugins
    suite (default 16, ``quick`` 4); ``curated_n``: prompts per curated suite (default all; ``quick``: 6, one per
    category); ``steps``: 25 (``quick``: 10)."""

    languages: tuple[str, ...] = ()
    methods: tuple[str, ...] = METHODS
    suites: tuple[str, ...] = DEFAULT_SUITES
    quick: bool = False
    n: int | None = None
    curated_n: int | None = None
    steps: int | None = None
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 50
    size: int | None = None
    backbone: str | None = None
    weights: Mapping[tuple[str, str], str] = field(default_factory=dict)
    grid_columns: int = 8
    world_clip: str | None = None
    device: str = "cpu"

    def resolved(self) -> dict[str, Any]:
        """``n``, ``curated_n``, ``plugin_n`` and ``steps`` with the full / quick defaults filled in (``n``, when
        given, is the plugins suite's scenes per row too)."""
        base = QUICK if self.quick else FULL
        return {"n": self.n if self.n is not None else base["n"],
                "plugin_n": self.n if self.n is not None else base["plugin_n"],
                "curated_n": self.curated_n if self.curated_n is not None else base["curated_n"],
                "steps": self.steps if self.steps is not None else base["steps"]}


@dataclass
class Cell:
    """One (suite, language, method), and in the plugins suite one plugin row: its metrics, or why it was skipped."""

    suite: str
    language: str
    method: str
    status: str  # "ok" or "skipped"
    reason: str = ""
    n: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    plugin: str | None = None  # the plugins suite's row (a plugin, a scheduler swap or "none")

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in asdict(self).items() if k != "plugin" or v is not None}


@dataclass
class Grid:
    """The first images of one (suite, language) per method, for the report, and what each method was given
    (plugins suite: one grid per plugin row, a row per side: English, then each language x method)."""

    suite: str
    language: str
    rows: dict[str, list[Any]] = field(default_factory=dict)  # "ground truth" / method -> PIL images
    inputs: dict[str, list[str]] = field(default_factory=dict)  # "prompt" / "english" / "translation" -> texts
    plugin: str | None = None


@dataclass
class BenchResult:
    settings: dict[str, Any]
    cells: list[Cell]
    grids: list[Grid]
    seconds: float
    started: str
    notes: list[str] = field(default_factory=list)

    def table(self) -> dict[str, Any]:
        """What ``--json`` prints: the settings, every cell (metrics or reason) and the time taken."""
        return {"polybridge_version": polybridge.__version__, "settings": self.settings, "started": self.started,
                "seconds": round(self.seconds, 1), "cells": [c.to_dict() for c in self.cells], "notes": self.notes}


def _json_number(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- checking a request


def bench_languages(registry: Registry) -> tuple[str, ...]:
    """The languages a benchmark can run: every native language (the backbone's is the english-reference)."""
    return registry.native_codes


def check_request(registry: Registry, settings: BenchSettings) -> tuple[str, ...]:
    """The languages to run; :class:`BenchError` names an unknown language, method or suite and lists the valid ones."""
    valid = bench_languages(registry)
    backbone_language = registry.backbone(settings.backbone).language
    for code in settings.languages:
        if code == backbone_language:
            raise BenchError(f"{code!r} is the backbone's language: its prompts are the english-reference method; "
                             f"valid languages: {', '.join(valid)}")
        if code not in valid:
            raise BenchError(f"unknown language {code!r}; valid: {', '.join(valid)}")
    for method in settings.methods:
        if method not in METHODS:
            raise BenchError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    for suite in settings.suites:
        if suite not in SUITES:
            raise BenchError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    for (code, method), _path in settings.weights.items():
        if code not in valid:
            raise BenchError(f"weights for unknown language {code!r}; valid: {', '.join(valid)}")
        if method not in BRANCH_METHODS:
            raise BenchError(f"weights for {code}:{method}: only branch methods take weights; valid: "
                             f"{', '.join(BRANCH_METHODS)}")
    resolved = settings.resolved()
    for key in ("n", "curated_n", "plugin_n", "steps"):
        if resolved[key] is not None and resolved[key] < 1:
            raise BenchError(f"{key} must be at least 1, got {resolved[key]}")
    if settings.guidance < 0 or not math.isfinite(settings.guidance):
        raise BenchError(f"guidance must be a finite number of at least 0, got {settings.guidance}")
    if settings.batch_size < 1 or settings.grid_columns < 1:
        raise BenchError("batch_size and grid_columns must be at least 1")
    if not settings.methods or not settings.suites:
        raise BenchError("give at least one method and one suite")
    return tuple(dict.fromkeys(settings.languages)) or valid


# --------------------------------------------------------------------------- methods


def naive_swap_branch(unet: Any, encoder: Any, code: str, seed: int, encoder_name: str = "") -> Any:
    """An untrained, seeded size-matching projection as a ``context`` branch: a one-layer pea adapter
    (LayerNorm, then Linear native width -> the backbone's cross-attention width) whose Linear is drawn
    from N(0, 1/width) with a seed of its own (``pea`` starts that layer at zero, which would erase the text)."""
    from polybridge.branches import get_branch_class

    branch = get_branch_class("pea").from_unet(unet, encoder.hidden_size, encoder_name=encoder_name, num_layers=1)
    linear = branch.mlp[-1]
    gen = torch.Generator().manual_seed(projection_seed(code, seed))
    with torch.no_grad():
        weight = torch.randn(linear.weight.shape, generator=gen) / math.sqrt(linear.weight.shape[1])
        linear.weight.copy_(weight.to(linear.weight.dtype))
    return branch.eval()


def projection_seed(code: str, seed: int) -> int:
    """The seed of language ``code``'s naive-swap projection (stable across runs and machines)."""
    return int(hashlib.sha256(f"naive-swap:{code}:{seed}".encode()).hexdigest()[:8], 16)


def branch_weights(entry: LanguageEntry, method: str,
                   weights: Mapping[tuple[str, str], str]) -> tuple[Path | str | None, str]:
    """Where ``method``'s branch for ``entry`` lives, or ``(None, why not)``."""
    code = entry.code
    if (code, method) in weights:
        source = Path(weights[(code, method)]).expanduser()
        return (source, "") if source.exists() else (None, f"--weights {code}:{method}: {source} does not exist")
    assert entry.branch is not None
    if entry.branch.type != method:
        return None, (f"no {method} branch: {code}'s entry has a {entry.branch.type} branch ({entry.file}, key "
                      f"branch.type); train one with `polybridge train --lang {code} --branch-type {method} --out DIR` "
                      f"and pass --weights {code}:{method}=DIR")
    source = entry.branch_source
    if source is None:
        return None, f"no trained {method} branch ({entry.file}: branch.weights is null)"
    if isinstance(source, Path) and not source.exists():
        return None, (f"no trained {method} branch: {source} is missing ({entry.file}, key branch.weights); "
                      f"train it with `polybridge train --lang {code}`")
    return source, ""


# --------------------------------------------------------------------------- the run


class _Context:
    """What every cell shares: the backbone, the scorer, the world CLIP, the settings."""

    def __init__(self, registry: Registry, settings: BenchSettings, log: Callable[[str], None]):
        from polybridge.backbones import load_backbone
        from polybridge.bench.metrics import load_world_clip
        from polybridge.pipeline import PolyBridgePipeline
        from polybridge.synthetic.scorer import load_default_scorer

        self.registry, self.settings, self.log = registry, settings, log
        self.resolved = settings.resolved()
        self.backbone = load_backbone(registry, settings.backbone)
        self.base = PolyBridgePipeline(**self.backbone.components(), backbone_language=self.backbone.language)
        self.base.set_progress_bar_config(disable=True)
        self.base.to(settings.device)  # the backbone's modules, shared by every language's pipeline
        self.scorer = load_default_scorer()
        self.world = load_world_clip(settings.world_clip)
        self.features = self.world.features()
        self.grammars: dict[str, Any] = {}
        self.english_cache: dict[Any, tuple[list[Any], dict[str, Any]]] = {}
        self.clips: dict[str, Any] = {}

    def generate(self, pipe: Any, prompts: Sequence[str], language: str) -> list[Any]:
        from polybridge.eval.attributes import generate

        s = self.settings
        return generate(pipe, list(prompts), guidance_scale=s.guidance, num_inference_steps=self.resolved["steps"],
                        seed=s.seed, batch_size=s.batch_size, size=s.size, language=language)

    def language_pipe(self, code: str, encoder: Any, branch: Any, scale: float) -> Any:
        from polybridge.pipeline import PolyBridgePipeline

        pipe = PolyBridgePipeline(**self.backbone.components(), backbone_language=self.backbone.language)
        pipe.set_progress_bar_config(disable=True)
        pipe.add_language(code, encoder, branch, scale=scale)
        return pipe.to(self.settings.device)

    def clip_for(self, source: str | Path) -> Any:
        from polybridge.bench.metrics import load_clip

        key = str(source)
        if key not in self.clips:
            try:
                self.clips[key] = load_clip(source)
            except Exception as exc:  # remembered, so each language reports it without retrying
                self.clips[key] = exc
        return self.clips[key]


def run_bench(registry: Registry, settings: BenchSettings, log: Callable[[str], None] = lambda _m: None,
              progress: bool = True) -> BenchResult:
    """Run the benchmark and return its cells and grids (write them with :func:`polybridge.bench.report.write_report`)."""
    from tqdm.auto import tqdm

    codes = check_request(registry, settings)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    started = time.time()
    ctx = _Context(registry, settings, log)
    load_seconds = time.time() - started
    cells: list[Cell] = []
    grids: list[Grid] = []
    per_language = [x for x in settings.suites if x != PLUGIN_SUITE]
    total = len(codes) * len(per_language) * len(settings.methods)
    if PLUGIN_SUITE in settings.suites:
        total += plugin_cell_count(len(codes), settings.methods)
    bar = tqdm(total=total, desc="bench", unit="cell", disable=not progress, dynamic_ncols=True)
    if progress:  # notes go above the bar, not through it

        def say(message: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                log(message)

        ctx.log = say
    for code in codes:
        lang_cells, lang_grids = _run_language(ctx, code, bar)
        cells.extend(lang_cells)
        grids.extend(lang_grids)
    if PLUGIN_SUITE in settings.suites:  # last: its plugins go on a private copy of the backbone anyway
        plugin_cells, plugin_grids = run_plugins(ctx, codes, bar)
        cells.extend(plugin_cells)
        grids.extend(plugin_grids)
    bar.close()
    seconds = time.time() - started
    resolved = ctx.resolved
    settings_record = {
        "registry": str(registry.file),
        "backbone": ctx.backbone.name,
        "backbone_source": ctx.backbone.source,
        "languages": list(codes),
        "methods": list(settings.methods),
        "suites": list(settings.suites),
        "quick": settings.quick,
        "prompts_per_synthetic_suite": resolved["n"] or "entry's benchmark.synthetic_prompts",
        "prompts_per_curated_suite": resolved["curated_n"] or "all",
        **({"plugin_scenes_per_row": resolved["plugin_n"],
            "plugin_scene_seed": {"seed": PLUGIN_SEED, "split": PLUGIN_SPLIT,
                                  "note": "one scene set per plugin row, the same for every language"}}
           if PLUGIN_SUITE in settings.suites else {}),
        "steps": resolved["steps"],
        "guidance_scale": settings.guidance,
        "scheduler": type(ctx.backbone.scheduler).__name__,
        "image_size": settings.size or "backbone default",
        "batch_size": settings.batch_size,
        "generation_seed": settings.seed,
        "generation_seeds": f"one torch.Generator per batch of {settings.batch_size}, seeded {settings.seed} + the "
                            "batch's first index (same for every method)",
        "scene_seeds": {c: {"seed": registry.language(c).benchmark.seed,
                            "split": registry.language(c).benchmark.synthetic_split} for c in codes},
        "naive_swap_projection_seeds": {c: projection_seed(c, settings.seed) for c in codes},
        "weights": {f"{c}:{m}": str(p) for (c, m), p in settings.weights.items()},
        "world_clip": ctx.world.source,
        "threads": torch.get_num_threads(),
        "device": settings.device,
        "load_seconds": round(load_seconds, 1),
    }
    return BenchResult(settings=settings_record, cells=cells, grids=grids, seconds=seconds, started=started_at)


def _run_language(ctx: _Context, code: str, bar: Any) -> tuple[list[Cell], list[Grid]]:
    from polybridge.bench.translate import build_dictionary
    from polybridge.synthetic.captions import load_grammars

    registry, settings = ctx.registry, ctx.settings
    entry = registry.language(code)
    english_code = ctx.backbone.language
    cells: list[Cell] = []
    grids: list[Grid] = []

    # The suites this language has (or why not).
    suites: dict[str, Suite | str] = {}
    dictionary = None
    for name in settings.suites:
        if name == PLUGIN_SUITE:
            continue  # run once for every language (polybridge.bench.plugins)
        try:
            if name == "curated":
                suites[name] = curated_suite(registry, code, ctx.resolved["curated_n"])
                continue
            reason = synthetic_unavailable(entry, name)
            if reason:
                suites[name] = reason
                continue
            if code not in ctx.grammars or english_code not in ctx.grammars:
                ctx.grammars.update(load_grammars(registry, [code, english_code]))
            if dictionary is None:
                dictionary = build_dictionary(ctx.grammars[code], ctx.grammars[english_code])
            suites[name] = synthetic_suite(registry, code, name, ctx.resolved["n"], grammars=ctx.grammars,
                                           dictionary=dictionary)
        except (SuiteError, OSError, ValueError) as exc:
            suites[name] = str(exc)

    # The curated suites' CLIP model (named per language).
    curated_clip: Any = None
    if isinstance(suites.get("curated"), Suite):
        source = entry.benchmark.clip_model
        if source is None:
            suites["curated"] = f"no CLIP model to score curated prompts ({entry.file}, key benchmark.clip_model)"
        else:
            clip = ctx.clip_for(entry.resolve(source))
            if isinstance(clip, Exception):
                suites["curated"] = str(clip)
            else:
                curated_clip = clip

    # The native encoder, once, if a method needs it.
    encoder, encoder_reason = None, ""
    if any(m in NATIVE_METHODS for m in settings.methods) and any(isinstance(s, Suite) for s in suites.values()):
        from polybridge.encoders import load_encoder

        try:
            encoder = load_encoder(entry)
        except (OSError, ValueError) as exc:
            encoder_reason = f"no native encoder: {exc}"

    for name in suites:
        if isinstance(suites[name], Suite) and len(suites[name]):
            grids.append(_grid(ctx, suites[name]))  # type: ignore[arg-type]
    grid_of = {g.suite: g for g in grids}

    for name, suite in suites.items():
        if isinstance(suite, str):
            ctx.log(f"{code}: {name} suite skipped: {suite}")
    for method in settings.methods:
        pipe, reason = _method_pipe(ctx, entry, method, encoder, encoder_reason)
        if reason and any(isinstance(suite, Suite) for suite in suites.values()):
            ctx.log(f"{code}: {method} skipped: {reason}")
        for name in suites:
            suite = suites[name]
            started = time.time()
            if isinstance(suite, str):
                cells.append(Cell(name, code, method, "skipped", suite))
            elif reason:
                cells.append(Cell(name, code, method, "skipped", reason))
            elif method == "translate" and not suite.has_truth:
                cells.append(Cell(name, code, method, "skipped", "the dictionary covers the synthetic world only; "
                                  "curated prompts need a real translation system"))
            else:
                images, metrics = _run_cell(ctx, suite, method, pipe, curated_clip)
                cells.append(Cell(name, code, method, "ok", n=len(images), metrics=metrics,
                                  seconds=round(time.time() - started, 2)))
                grid_of[name].rows[method] = images[:settings.grid_columns]
            bar.update(1)
            bar.set_postfix_str(f"{code} {name} {method}")
        del pipe
    return cells, grids


def _method_pipe(ctx: _Context, entry: LanguageEntry, method: str, encoder: Any,
                 encoder_reason: str) -> tuple[Any, str]:
    """The pipeline a method runs on, or ``(None, why it cannot run)``."""
    if method in ("english-reference", "translate"):
        return ctx.base, ""
    if encoder is None:
        return None, encoder_reason or "no native encoder"
    assert entry.encoder is not None and entry.branch is not None
    if method == "naive-swap":
        branch = naive_swap_branch(ctx.backbone.unet, encoder, entry.code, ctx.settings.seed,
                                   encoder_name=entry.encoder.source)
        return ctx.language_pipe(entry.code, encoder, branch, 1.0), ""
    source, reason = branch_weights(entry, method, ctx.settings.weights)
    if source is None:
        return None, reason
    try:
        branch = load_branch(source, ctx.backbone.unet)
        if branch.branch_type != method:
            return None, f"{source} holds a {branch.branch_type} branch, not a {method} one"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an encoder-name mismatch is reported by `polybridge generate`
            return ctx.language_pipe(entry.code, encoder, branch, entry.branch.scale), ""
    except (OSError, ValueError) as exc:
        return None, f"cannot load the {method} branch from {source}: {exc}"


def _grid(ctx: _Context, suite: Suite) -> Grid:
    from polybridge.synthetic.render import render_scene

    k = ctx.settings.grid_columns
    items = suite.items[:k]
    grid = Grid(suite.name, suite.language)
    if suite.has_truth:
        size = ctx.settings.size or _backbone_size(ctx)
        grid.rows["ground truth"] = [render_scene(item.scene, size) for item in items]
        grid.inputs["translation"] = [item.translation or "" for item in items]
    else:
        grid.inputs["category"] = [item.category or "" for item in items]
    grid.inputs["prompt"] = [item.prompt for item in items]
    grid.inputs["english"] = [item.english for item in items]
    return grid


def _backbone_size(ctx: _Context) -> int:
    sample = ctx.backbone.unet.config.sample_size
    sample = sample if isinstance(sample, int) else sample[0]
    return sample * ctx.base.vae_scale_factor


def _run_cell(ctx: _Context, suite: Suite, method: str, pipe: Any, curated_clip: Any) -> tuple[list[Any], dict]:
    from polybridge.bench.metrics import accuracy_metrics, clip_score, fid
    from polybridge.synthetic.render import render_scene

    english_language = ctx.backbone.language
    if method == "english-reference":
        prompts, language = suite.english, english_language
    elif method == "translate":
        prompts, language = suite.translations, english_language
    else:
        prompts, language = suite.prompts, suite.language
    # The general suite's scenes and English captions are the same for every language: generate them once.
    key = None
    if method == "english-reference" and suite.has_truth and not suite.concepts:
        key = (suite.name, tuple(suite.english), tuple(item.index for item in suite.items))
        if key in ctx.english_cache:
            images, metrics = ctx.english_cache[key]
            return images, dict(metrics, shared_with="every language (same scenes and English captions)")
    images = ctx.generate(pipe, prompts, language)
    metrics: dict[str, Any] = {}
    if suite.has_truth:
        scenes = suite.scenes
        renders = [render_scene(s, images[0].size[0]) for s in scenes]
        metrics.update(accuracy_metrics(ctx.scorer, images, scenes, suite.concepts))
        metrics["clip_t"] = clip_score(ctx.world, images, suite.english)
        metrics["clip_i"] = clip_score(ctx.world, images, renders)
        metrics["fid"] = fid(ctx.features, renders, images)
    else:
        metrics["clip_t"] = clip_score(curated_clip, images, suite.prompts)
        metrics["clip_model"] = curated_clip.source
        by_category: dict[str, list[int]] = {}
        for i, item in enumerate(suite.items):
            by_category.setdefault(item.category or "", []).append(i)
        metrics["per_category"] = {
            c: clip_score(curated_clip, [images[i] for i in idx], [suite.prompts[i] for i in idx])
            for c, idx in by_category.items()}
    if key is not None:
        ctx.english_cache[key] = (images, metrics)
    return images, metrics
