"""The ``plugins`` suite: does a plugin made for the English backbone still work when the prompt is native?

For every plugin row (``none``, each toy plugin of :data:`~polybridge.embedded.toy_plugins.TOY_PLUGINS`, and the
scheduler swaps of :data:`SCHEDULERS`) the same scenes are drawn twice over:

- **English side**: the backbone alone, prompted with the English caption plus the plugin's words
  (``"<caption>, <words>"``; a trigger, a Textual Inversion token, or nothing);
- **native side**: each language's trained branch (``bdm``, and ``pea`` where the language has pea weights),
  prompted with the native caption, the plugin's words as ``english_prompt`` (the English part of the prompt).

The plugin is applied as a user would (:func:`polybridge.plugins.use.plugins_applied`: the registry's ``plugins:``
by name; a ControlNet's hint as ``image=``; a scheduler by ``from_config`` of the backbone's). Every image is read
back by the plugin scorer (:mod:`polybridge.synthetic.plugin_scorer`) against the ground truth:

- ``effect``: share of images showing the plugin's effect (per row kind, :data:`CONTENT`): ``style``: every object
  read in the target style; ``layout``: objects read at exactly the hint scene's positions (the hint is drawn from a
  *moved* copy of the scene, :func:`moved_scene`, so following the prompt cannot score); ``unnamed``: the unnamed
  object read exactly where it is (and nowhere else); ``background``: the background read as the target.
  No effect (NaN) for ``none`` and the schedulers.
- ``content``: share of images with every attribute the prompt asks for right, the plugin's own aside
  (:data:`CONTENT`), as the main suites' ``scene``; ``content_mean`` is the mean of those attributes' accuracies, as
  their ``accuracy``; each attribute's accuracy is there too (objects per object, position and background per image).
- ``joint``: share of images with both (``content`` where there is no effect).
- ``compatibility`` (native cells) = native ``joint`` / English ``joint`` on the same scenes (NaN when English
  draws none right).

One scene set per row, the same for every language (:data:`PLUGIN_SEED`, split ``test``, a stream of its own),
so the English side runs once per row and every language is compared with it. Generation seeds are the
benchmark's: one generator per batch, seeded ``seed + first index``, the same for every language.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from polybridge.synthetic.world import POSITIONS, SHAPES, Scene

#: The suite's name in ``--suites``.
PLUGIN_SUITE = "plugins"
#: The scene stream of the suite (distinct from every entry's ``benchmark.seed``), and its split.
PLUGIN_SEED = 2121
PLUGIN_SPLIT = "test"
#: Scheduler swaps: (row name, diffusers class), each made with ``from_config`` of the backbone's scheduler config.
SCHEDULERS: tuple[tuple[str, str], ...] = (
    ("ddim", "DDIMScheduler"),
    ("euler", "EulerDiscreteScheduler"),
    ("euler-ancestral", "EulerAncestralDiscreteScheduler"),
    ("unipc", "UniPCMultistepScheduler"),
    ("dpm-solver++", "DPMSolverMultistepScheduler"),
)
#: What each row's content is: the prompt's attributes, the plugin's own aside (key: the row's effect).
CONTENT: dict[str | None, tuple[str, ...]] = {
    None: ("shape", "colour", "size", "position", "background"),
    # the backbone's own VAE cannot carry a styled object's shape (outline: 0.455 read back from a VAE round trip of
    # the ground truth, solid 0.869; `python scripts/measure_vae_styles.py`), so a style row leaves shape out
    "style": ("colour", "size", "position", "background"),
    "layout": ("shape", "colour", "background"),  # position and size are the hint's
    "unnamed": ("colour", "size", "position", "background"),  # the object is the token's
    "background": ("shape", "colour", "size", "position"),
}
EFFECT_HELP: dict[str, str] = {
    "style": "every object read in the plugin's style",
    "layout": "objects read at exactly the positions of the (moved) scene the hint was drawn from",
    "unnamed": "the unnamed object read exactly where it is, and nowhere else",
    "background": "the background read as the plugin's",
}
ENGLISH_METHOD = "english-reference"


@dataclass(frozen=True)
class PluginRow:
    """One row of the suite: no plugin, a toy plugin (by its registry name) or a scheduler swap."""

    name: str
    kind: str  # none | lora | controlnet | textual_inversion | checkpoint | scheduler
    words: str = ""  # English words the user adds
    effect: str | None = None  # style | layout | unnamed | background; None: content only
    target: str = ""
    scheduler: str | None = None  # diffusers class name, for kind == scheduler


def plugin_rows() -> tuple[PluginRow, ...]:
    """``none``, every toy plugin, every scheduler swap, in report order."""
    from polybridge.embedded.toy_plugins import TOY_PLUGINS

    return (PluginRow("none", "none"),
            *(PluginRow(p.name, p.kind, p.words, p.effect, p.target) for p in TOY_PLUGINS),
            *(PluginRow(name, "scheduler", scheduler=cls) for name, cls in SCHEDULERS))


# --------------------------------------------------------------------------- scenes and prompts


def moved_scene(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with every object at another valid place than the prompt says: one object at another position
    (drawn with ``rng``), two objects at the other position pair (left/right <-> top/bottom, jitter transposed, so
    the objects stay exactly as far apart as before and never touch)."""
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        position = rng.choice([p for p in POSITIONS if p != obj.position])
        return dataclasses.replace(scene, objects=(dataclasses.replace(obj, position=position),))
    swap = {"left": "top", "right": "bottom", "top": "left", "bottom": "right"}
    return dataclasses.replace(scene, objects=tuple(
        dataclasses.replace(o, position=swap[o.position], dx=o.dy, dy=o.dx) for o in scene.objects))


def plugin_scenes(row: PluginRow, n: int, seed: int = PLUGIN_SEED,
                  split: str = PLUGIN_SPLIT) -> list[tuple[int, Scene, Scene | None]]:
    """The row's ``n`` scenes with their stream indices and, for a layout row, the moved scene of the hint.

    Generic shapes on the suite's stream; a style row draws them in its style, an unnamed row draws the unnamed
    object alone, a background row keeps the scenes whose background is not its target (so the change shows)."""
    from polybridge.synthetic.scenes import sample_scenes, scene_rng

    if row.effect == "unnamed":
        return [(i, s, None) for i, s in enumerate(sample_scenes(n, seed, split, n_objects=1, objects=[row.target]))]
    styles = [row.target] if row.effect == "style" else None
    if row.effect != "background":
        scenes = sample_scenes(n, seed, split, objects=SHAPES, styles=styles)
        return [(i, s, moved_scene(s, scene_rng(seed, split, i, "plugin-layout")) if row.effect == "layout" else None)
                for i, s in enumerate(scenes)]
    found: list[tuple[int, Scene, Scene | None]] = []
    start, window = 0, max(16, 2 * n)
    while len(found) < n:
        for i, scene in enumerate(sample_scenes(window, seed, split, objects=SHAPES, start=start), start):
            if scene.background != row.target and len(found) < n:
                found.append((i, scene, None))
        start += window
    return found


def english_prompt(caption: str, words: str) -> str:
    """The English side's prompt: the caption, then the plugin's words."""
    return f"{caption}, {words}" if words else caption


# --------------------------------------------------------------------------- metrics


def judge(row: PluginRow, predictions: Sequence[dict], scenes: Sequence[Scene],
          hints: Sequence[Scene | None]) -> dict[str, Any]:
    """The row's metrics for images read as ``predictions`` (the plugin scorer's) of ``scenes`` (see module doc)."""
    from polybridge.synthetic.plugin_scorer import score_plugin_predictions

    content_keys = CONTENT[row.effect]
    # Where each object should be read: a layout row's objects belong where its hint put them.
    truths = [h if row.effect == "layout" and h is not None else s for s, h in zip(scenes, hints, strict=True)]
    effect_ok, content_ok = [], []
    for pred, truth in zip(predictions, truths, strict=True):
        one = score_plugin_predictions([pred], [truth])
        content_ok.append(all(one[k] == 1.0 for k in content_keys))
        if row.effect == "style":
            effect_ok.append(one["style"] == 1.0 and all(o.style == row.target for o in truth.objects))
        elif row.effect == "layout":
            effect_ok.append(one["position"] == 1.0)
        elif row.effect == "unnamed":
            effect_ok.append(one["unnamed"] == 1.0)
        elif row.effect == "background":
            effect_ok.append(pred["background"] == row.target)
    whole = score_plugin_predictions(list(predictions), truths)
    n = len(content_ok)
    out: dict[str, Any] = {"effect": _rate(effect_ok) if row.effect else math.nan, "content": _rate(content_ok)}
    out["joint"] = _rate([e and c for e, c in zip(effect_ok, content_ok)]) if row.effect else out["content"]
    out["content_mean"] = sum(whole[k] for k in content_keys) / len(content_keys) if n else math.nan
    out.update({k: whole[k] for k in content_keys})
    return out


def _rate(flags: Sequence[bool]) -> float:
    return sum(map(bool, flags)) / len(flags) if flags else math.nan


def compatibility(native_joint: float, english_joint: float) -> float:
    """Native joint rate / English joint rate (NaN when English has none right)."""
    if english_joint is None or native_joint is None or math.isnan(english_joint) or english_joint == 0:
        return math.nan
    return native_joint / english_joint


# --------------------------------------------------------------------------- the run


def cell_count(n_languages: int, methods: Sequence[str]) -> int:
    """Cells the suite reports (for the progress bar): per row, the English side plus each language x method."""
    from polybridge.bench.runner import BRANCH_METHODS

    return len(plugin_rows()) * (1 + n_languages * sum(m in BRANCH_METHODS for m in methods))


def run_plugins(ctx: Any, codes: Sequence[str], bar: Any) -> tuple[list[Any], list[Any]]:
    """The suite's cells and grids (one grid per row: ground truth, hint, English, then each language x method)."""
    from polybridge.bench.runner import BRANCH_METHODS, Cell, Grid
    from polybridge.synthetic.plugin_scorer import load_plugin_scorer
    from polybridge.synthetic.scorer import ScorerError

    settings = ctx.settings
    english_code = ctx.backbone.language
    methods = [m for m in settings.methods if m in BRANCH_METHODS]
    rows = plugin_rows()
    cells: list[Cell] = []

    def skip_all(reason: str) -> tuple[list[Cell], list[Grid]]:
        ctx.log(f"plugins suite skipped: {reason}")
        for row in rows:
            cells.append(Cell(PLUGIN_SUITE, english_code, ENGLISH_METHOD, "skipped", reason, plugin=row.name))
            for code in codes:
                for method in methods:
                    cells.append(Cell(PLUGIN_SUITE, code, method, "skipped", reason, plugin=row.name))
                    bar.update(1)
            bar.update(1)
        return cells, []

    if not methods:
        return skip_all("it compares branch methods (bdm, pea) with English; --methods names neither")
    try:
        scorer = load_plugin_scorer()
    except ScorerError as exc:
        return skip_all(f"no plugin scorer: {exc}")
    run = _Run(ctx, codes, methods)
    grids = []
    for row in rows:
        grid, row_cells = run.row(row, scorer, bar)
        cells.extend(row_cells)
        if grid is not None:
            grids.append(grid)
    return cells, grids


class _Run:
    """The suite's pipelines (one per side: English, each branch method with every language of it loaded), on a
    private copy of the backbone, so no plugin can leak into another suite."""

    def __init__(self, ctx: Any, codes: Sequence[str], methods: Sequence[str]):
        from polybridge.pipeline import PolyBridgePipeline
        from polybridge.synthetic.captions import load_grammars

        self.ctx, self.codes, self.methods = ctx, list(codes), list(methods)
        self.english_code = ctx.backbone.language
        self.n = ctx.resolved["plugin_n"]
        components = copy.deepcopy(ctx.backbone.components())
        self.scheduler = components["scheduler"]

        def pipe() -> Any:
            p = PolyBridgePipeline(**components, backbone_language=self.english_code)
            p.set_progress_bar_config(disable=True)
            return p.to(ctx.settings.device)

        self.english = pipe()
        self.pipes = {m: pipe() for m in methods}
        self.reasons: dict[tuple[str, str], str] = {}  # (code, method) -> why it cannot run
        with_grammar = [c for c in codes if ctx.registry.language(c).synthetic is not None]
        self.grammars = load_grammars(ctx.registry, [*with_grammar, self.english_code])
        for code in codes:
            self._load_language(code)

    def _load_language(self, code: str) -> None:
        from polybridge.bench.runner import branch_weights
        from polybridge.bench.suites import synthetic_unavailable
        from polybridge.branches import load_branch
        from polybridge.encoders import load_encoder

        ctx, entry = self.ctx, self.ctx.registry.language(code)
        reason = synthetic_unavailable(entry, "general")
        encoder = None
        if not reason:
            try:
                encoder = load_encoder(entry)
            except (OSError, ValueError) as exc:
                reason = f"no native encoder: {exc}"
        for method in self.methods:
            if reason:
                self.reasons[(code, method)] = reason
                continue
            source, why = branch_weights(entry, method, ctx.settings.weights)
            if source is None:
                self.reasons[(code, method)] = why
                continue
            try:
                branch = load_branch(source, self.pipes[method].unet)
                if branch.branch_type != method:
                    self.reasons[(code, method)] = f"{source} holds a {branch.branch_type} branch, not a {method} one"
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an encoder-name mismatch is reported by `polybridge generate`
                    self.pipes[method].add_language(code, encoder, branch, scale=entry.branch.scale)
            except (OSError, ValueError) as exc:
                self.reasons[(code, method)] = f"cannot load the {method} branch from {source}: {exc}"
        for method in self.methods:
            if (code, method) in self.reasons:
                ctx.log(f"{code}: plugins/{method} skipped: {self.reasons[(code, method)]}")

    def row(self, row: PluginRow, scorer: Any, bar: Any) -> tuple[Any, list[Any]]:
        from polybridge.bench.runner import Cell, Grid
        from polybridge.synthetic.render import render_hint, render_scene
        from polybridge.synthetic.scenes import scene_rng

        settings = self.ctx.settings
        drawn = plugin_scenes(row, self.n)
        scenes, hints = [s for _, s, _ in drawn], [h for _, _, h in drawn]
        size = settings.size or _image_size(self.english)
        hint_images = [render_hint(h, size, kind=row.target) for h in hints] if row.effect == "layout" else None

        def captions(code: str) -> list[str]:
            grammar = self.grammars[code]
            return [grammar.caption(s, scene_rng(PLUGIN_SEED, PLUGIN_SPLIT, i, "bench-plugins")) for i, s, _ in drawn]

        english = [english_prompt(c, row.words) for c in captions(self.english_code)]
        cells: list[Cell] = []
        k = settings.grid_columns
        grid = Grid(PLUGIN_SUITE, "", plugin=row.name)
        grid.rows["ground truth"] = [render_scene(s, size) for s in scenes[:k]]
        if hint_images is not None:
            grid.rows["hint"] = hint_images[:k]
        grid.inputs["english"] = english[:k]

        # The English side, then each method's languages; the plugin on each pipeline in turn, taken off after.
        started = time.time()
        images, reason = self._generate(self.english, row, english, self.english_code, "", hint_images)
        if reason:
            ref: dict[str, Any] = {}
            cells.append(Cell(PLUGIN_SUITE, self.english_code, ENGLISH_METHOD, "skipped", reason, plugin=row.name))
        else:
            ref = judge(row, scorer.predict(images), scenes, hints)
            cells.append(Cell(PLUGIN_SUITE, self.english_code, ENGLISH_METHOD, "ok", n=len(images),
                              metrics=dict(ref), seconds=round(time.time() - started, 2), plugin=row.name))
            grid.rows[self.english_code] = images[:k]
        bar.update(1)
        bar.set_postfix_str(f"plugins {row.name} {self.english_code}")
        for method in self.methods:
            jobs = [c for c in self.codes if (c, method) not in self.reasons] if not reason else []
            prompts = {c: captions(c) for c in jobs}
            results, why = self._generate_many(self.pipes[method], row, prompts, hint_images) if jobs else ({}, "")
            for code in self.codes:
                started = time.time()
                skip = reason or self.reasons.get((code, method)) or why
                if skip:
                    cells.append(Cell(PLUGIN_SUITE, code, method, "skipped", skip, plugin=row.name))
                else:
                    out, seconds = results[code]
                    metrics = judge(row, scorer.predict(out), scenes, hints)
                    metrics.update({f"english_{m}": ref[m] for m in ("effect", "content", "joint")})
                    metrics["compatibility"] = compatibility(metrics["joint"], ref["joint"])
                    cells.append(Cell(PLUGIN_SUITE, code, method, "ok", n=len(out), metrics=metrics,
                                      seconds=round(seconds + time.time() - started, 2), plugin=row.name))
                    grid.rows[f"{code} {method}"] = out[:k]
                    grid.inputs[f"{code} {method}"] = prompts[code][:k]
                bar.update(1)
                bar.set_postfix_str(f"plugins {row.name} {code} {method}")
        return (grid if self.english_code in grid.rows else None), cells

    def _generate_many(self, pipe: Any, row: PluginRow, prompts: dict[str, list[str]],
                       hints: list[Any] | None) -> tuple[dict[str, tuple[list[Any], float]], str]:
        """Each language's images on ``pipe`` with the row's plugin applied once, or ``({}, why not)``."""
        from polybridge.plugins import PluginError

        out: dict[str, tuple[list[Any], float]] = {}
        try:
            with self._applied(pipe, row):
                for code, texts in prompts.items():
                    started = time.time()
                    out[code] = (self._images(pipe, texts, code, row.words, hints), time.time() - started)
        except PluginError as exc:
            return {}, str(exc)
        return out, ""

    def _generate(self, pipe: Any, row: PluginRow, prompts: list[str], language: str, words: str,
                  hints: list[Any] | None) -> tuple[list[Any], str]:
        from polybridge.plugins import PluginError

        try:
            with self._applied(pipe, row):
                return self._images(pipe, prompts, language, words, hints), ""
        except PluginError as exc:
            return [], str(exc)

    def _applied(self, pipe: Any, row: PluginRow) -> Any:
        """The row's plugin on ``pipe`` for a ``with`` block, taken off after; a :class:`PluginError` says why it
        cannot be applied (not listed in the registry, listed as another kind, missing on disk, another
        architecture)."""
        from polybridge.plugins import PluginError
        from polybridge.plugins.use import check_plugin, plugins_applied

        registry = self.ctx.registry
        if row.kind == "scheduler":
            return _scheduler_swapped(pipe, row.scheduler, self.scheduler)
        if row.kind == "none":
            return plugins_applied(pipe, registry)
        spec = registry.plugins.get(row.name)
        if spec is None:
            raise PluginError(f"plugin {row.name!r} is not listed in {registry.file} (key plugins; listed: "
                              f"{', '.join(registry.plugins) or 'none'}); build it with "
                              "`python scripts/build_toy_plugins.py`")
        if spec.kind != row.kind:
            raise PluginError(f"plugin {row.name!r} is a {spec.kind} in {registry.file}, the suite expects a {row.kind}")
        check_plugin(registry, row.name)  # missing on disk, or a config of another architecture
        if row.kind == "checkpoint":
            return plugins_applied(pipe, registry, checkpoint=row.name)
        key = {"lora": "loras", "controlnet": "controlnets", "textual_inversion": "tis"}[row.kind]
        return plugins_applied(pipe, registry, **{key: [row.name]})

    def _images(self, pipe: Any, prompts: list[str], language: str, words: str, hints: list[Any] | None) -> list[Any]:
        """Images in batches, one generator per batch seeded ``seed + first index`` (every side alike)."""
        import torch

        s = self.ctx.settings
        images: list[Any] = []
        with torch.no_grad():
            for start in range(0, len(prompts), s.batch_size):
                chunk = prompts[start:start + s.batch_size]
                extra: dict[str, Any] = {"english_prompt": words} if words else {}
                if hints is not None:
                    extra["image"] = hints[start:start + s.batch_size]
                out = pipe(chunk, language=language, guidance_scale=s.guidance,
                           num_inference_steps=self.ctx.resolved["steps"],
                           generator=torch.Generator().manual_seed(s.seed + start), height=s.size, width=s.size,
                           **extra)
                images.extend(out.images)
        return images


class _scheduler_swapped:
    """``pipe.scheduler = cls.from_config(base.config)`` for a ``with`` block, the base scheduler back after."""

    def __init__(self, pipe: Any, name: str | None, base: Any):
        self.pipe, self.name, self.base = pipe, name, base

    def __enter__(self) -> Any:
        import diffusers

        self.pipe.scheduler = getattr(diffusers, str(self.name)).from_config(self.base.config)
        return self.pipe

    def __exit__(self, *exc: object) -> None:
        self.pipe.scheduler = self.base


def _image_size(pipe: Any) -> int:
    sample = pipe.unet.config.sample_size
    return (sample if isinstance(sample, int) else sample[0]) * pipe.vae_scale_factor
