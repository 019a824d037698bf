"""The plugin scorer: the ground-truth scorer for what plugins change in the world.

The committed :class:`~polybridge.synthetic.scorer.SceneScorer` reads the default world and stays as it
is, so every figure measured with it stays valid. :class:`PluginScorer` is the same network reading the
wider world that plugin benchmarks draw: every :data:`~polybridge.synthetic.world.DRAWABLE` object (the
unnamed ones too) and, per object, its :data:`~polybridge.synthetic.world.STYLES` style, beside the
background, colour, size and position the scene scorer reads. Its default weights are fine-tuned from
the scene scorer's by ``python scripts/build_plugin_scorer.py`` (``assets/plugin-scorer/README.md``).

What each plugin's effect is scored as (:func:`score_plugin_predictions`):

- a style (LoRA): ``style``, per object, the style read at its position;
- a layout hint (ControlNet, :func:`~polybridge.synthetic.render.render_hint`): ``position``, per image,
  objects read at exactly the positions of the scene the hint was drawn from;
- an unnamed object (Textual Inversion): ``unnamed``, per image, an unnamed object read exactly where the
  scene has one (and nowhere else), with ``unnamed_recall``, ``unnamed_colour`` and ``unnamed_position``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from polybridge.synthetic.scorer import WEIGHTS_NAME, SceneScorer, ScorerError, score_predictions
from polybridge.synthetic.world import DRAWABLE, STYLES, UNNAMED_OBJECTS, Scene

#: Where the committed default weights live.
DEFAULT_PLUGIN_SCORER_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "plugin-scorer"


class PluginScorer(SceneScorer):
    """A :class:`SceneScorer` over every drawable object, with a per-object ``style`` head."""

    FORMAT = "polybridge-plugin-scorer"
    VERSION = 1
    WORLD_CLASSES = {**SceneScorer.WORLD_CLASSES, "objects": list(DRAWABLE), "styles": list(STYLES)}
    OBJECT_ATTRIBUTES = {"style": STYLES}
    BUILD = "scripts/build_plugin_scorer.py"

    @classmethod
    def from_scene_scorer(cls, scene_scorer: SceneScorer) -> "PluginScorer":
        """A plugin scorer that starts as ``scene_scorer``: same trunks and heads, the new object classes and the
        style head freshly initialised (what the build script fine-tunes)."""
        arch = ("image_size", "widths", "hidden", "colour_widths", "colour_hidden")
        model = cls(*(scene_scorer.config[k] for k in arch))
        state = scene_scorer.state_dict()
        new = model.state_dict()
        old_objects = list(SceneScorer.WORLD_CLASSES["objects"])
        # Rows of each position's head: old [objects, empty, sizes] → new [objects + unnamed, empty, sizes, styles].
        rows = [DRAWABLE.index(o) for o in old_objects] + [model.n_obj - 1] + [model.n_obj + i for i in range(model.n_size)]
        for key, value in state.items():
            if key.startswith("heads."):
                new[key][rows] = value
            else:
                new[key] = value
        model.load_state_dict(new)
        return model

    def score_predictions(self, predictions: Sequence[dict], scenes: Sequence[Scene | dict]) -> dict:
        """The scene scorer's figures plus the plugin ones (:func:`score_plugin_predictions`)."""
        return score_plugin_predictions(predictions, scenes)


def score_plugin_predictions(predictions: Sequence[dict], scenes: Sequence[Scene | dict]) -> dict:
    """:func:`~polybridge.synthetic.scorer.score_predictions` plus what plugins change (accuracies in [0, 1]):

    - ``style``: per true object, the style read at its position (a missed object is wrong); ``per_style``.
    - ``unnamed``: per image, the unnamed objects read (id and position) are exactly the scene's, none
      where there is none: whether the object is drawn, and where.
    - ``unnamed_recall`` / ``unnamed_colour``: per true unnamed object, read as itself / in its colour at its position.
    - ``unnamed_position``: per image holding an unnamed object, the occupied positions exactly right.
    - ``n_unnamed``: unnamed objects the figures rest on. A figure with nothing to rest on is NaN.
    """
    scenes = [Scene.from_dict(s) if isinstance(s, dict) else s for s in scenes]
    result = score_predictions(predictions, scenes)
    style, unnamed, recall, colour, position = [], [], [], [], []
    per_style: dict[str, list[int]] = {s: [] for s in STYLES}
    for pred, truth in zip(predictions, scenes, strict=True):
        at = {o["position"]: o for o in pred["objects"]}
        for o in truth.objects:
            ok = int(at.get(o.position, {}).get("style") == o.style)
            style.append(ok)
            per_style[o.style].append(ok)
        read = {(o["position"], o["shape"]) for o in pred["objects"] if o["shape"] in UNNAMED_OBJECTS}
        true = {(o.position, o.shape) for o in truth.objects if o.is_unnamed}
        unnamed.append(int(read == true))
        for o in truth.objects:
            if o.is_unnamed:
                p = at.get(o.position, {})
                recall.append(int(p.get("shape") == o.shape))
                colour.append(int(p.get("colour") == o.colour))
        if true:
            position.append(int(set(at) == {o.position for o in truth.objects}))

    def mean(v: list[int]) -> float:
        return float(sum(v) / len(v)) if v else math.nan

    result.update({
        "style": mean(style), "per_style": {k: mean(v) for k, v in per_style.items()},
        "unnamed": mean(unnamed), "unnamed_recall": mean(recall), "unnamed_colour": mean(colour),
        "unnamed_position": mean(position), "n_unnamed": len(recall),
    })
    return result


def load_plugin_scorer() -> PluginScorer:
    """The committed plugin scorer; a clear error says how to build it when the weights are absent."""
    if not (DEFAULT_PLUGIN_SCORER_DIR / WEIGHTS_NAME).is_file():
        raise ScorerError(
            f"{DEFAULT_PLUGIN_SCORER_DIR / WEIGHTS_NAME}: missing; build it with `python {PluginScorer.BUILD}`"
        )
    return PluginScorer.from_pretrained(DEFAULT_PLUGIN_SCORER_DIR)

