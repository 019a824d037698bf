"""What plugins change in the synthetic world: styles, hint maps, the unnamed object, the plugin scorer.

The defaults must stay exactly as they were, so every figure measured before them stays valid: the
fingerprints below were measured on the code before styles, hints and unnamed objects existed
(commit f6ff59b), with the same computation as :func:`_fingerprint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest
import yaml

from polybridge.errors import PolyBridgeError
from polybridge.registry import load_registry
from polybridge.synthetic.captions import load_grammars
from polybridge.synthetic.dataset import caption_rng
from polybridge.synthetic.grammar import OBJECT, GrammarError, load_grammar
from polybridge.synthetic.plugin_scorer import (
    PluginScorer,
    load_plugin_scorer,
    score_plugin_predictions,
)
from polybridge.synthetic.render import (
    HINT_KINDS,
    object_geometry,
    render_hint,
    render_scene,
)
from polybridge.synthetic.scenes import sample_scenes
from polybridge.synthetic.scorer import (
    SceneScorer,
    ScorerError,
    load_default_scorer,
    scene_targets,
)
from polybridge.synthetic.world import (
    BACKGROUNDS,
    CONCEPTS,
    DEFAULT_STYLE,
    DRAWABLE,
    OBJECTS,
    SHAPES,
    STYLES,
    UNNAMED_OBJECTS,
    Scene,
    SceneObject,
)

# Measured on f6ff59b (before this change) by the computation in _fingerprint.
DEFAULT_FINGERPRINT = {
    "scenes": "7cf5eb2540c1044c",
    "render32": "a2000a2718ac268d",
    "render64": "02834dd60bafd0f0",
    "captions": "3fd035b933584c91",
    "scorer_predictions": "e13642593d95ade1",
}


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _default_scenes() -> list[Scene]:
    scenes = []
    for split in ("train", "validation", "test"):
        scenes += sample_scenes(40, 7, split) + sample_scenes(10, 7, split, n_objects=2, concepts=["torii"])
        scenes += sample_scenes(10, 7, split, objects=["fan", "star"])
    return scenes


@pytest.fixture(scope="module")
def default_scorer():
    return load_default_scorer()


@pytest.fixture(scope="module")
def grammars():
    return load_grammars(load_registry())


def test_default_world_is_bit_identical(grammars, default_scorer):
    """Sampling, rendering, captions and the committed scorer's readings of default scenes, as before."""
    scenes = _default_scenes()
    got = {
        "scenes": _h(json.dumps([s.to_dict() for s in scenes], sort_keys=True).encode()),
        "render32": _h(b"".join(np.asarray(render_scene(s, 32)).tobytes() for s in scenes)),
        "render64": _h(b"".join(np.asarray(render_scene(s, 64)).tobytes() for s in scenes[:60])),
    }
    captions = {c: [g.caption(s, caption_rng(7, "test", i, c)) for i, s in enumerate(scenes)] for c, g in sorted(grammars.items())}
    got["captions"] = _h(json.dumps(captions, ensure_ascii=False).encode())
    predictions = default_scorer.predict([render_scene(s, 32) for s in scenes])
    got["scorer_predictions"] = _h(json.dumps(predictions, sort_keys=True).encode())
    assert got == DEFAULT_FINGERPRINT
    assert all(o.style == DEFAULT_STYLE for s in scenes for o in s.objects)


def test_default_sampler_draws_no_style_and_no_unnamed_object():
    scenes = sample_scenes(1500, 0, "test")
    assert {o.shape for s in scenes for o in s.objects} == set(OBJECTS)
    assert {o.style for s in scenes for o in s.objects} == {DEFAULT_STYLE}


# ----------------------------------------------------------------------------- styles


def test_styled_scenes_are_the_default_scenes_restyled():
    plain = sample_scenes(200, 3, "validation", objects=DRAWABLE)
    styled = sample_scenes(200, 3, "validation", objects=DRAWABLE, styles=STYLES)
    assert [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, style=DEFAULT_STYLE) for o in s.objects))
            for s in styled] == plain
    assert {o.style for s in styled for o in s.objects} == set(STYLES)
    assert sample_scenes(5, 3, styles=STYLES, start=4) == sample_scenes(9, 3, styles=STYLES)[4:]
    only = sample_scenes(30, 3, styles=["striped"])
    assert {o.style for s in only for o in s.objects} == {"striped"}
    # A style other than the default is saved; the default is not, so old records read as they did.
    for s in styled[:40]:
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        assert all(("style" in d) == (o.style != DEFAULT_STYLE) for d, o in zip(s.to_dict()["objects"], s.objects))


@pytest.mark.parametrize("styles", [["wavy"], [], "outline"])
def test_bad_styles_are_refused(styles):
    with pytest.raises(PolyBridgeError, match="style"):
        sample_scenes(3, 0, styles=styles)


def test_bad_style_is_refused_by_the_renderer():
    with pytest.raises(PolyBridgeError, match="style='wavy'"):
        render_scene(Scene("black", (SceneObject("circle", "red", "large", "center", style="wavy"),)))


@pytest.mark.parametrize("shape", SHAPES + ("torii", "crescent") + UNNAMED_OBJECTS)
def test_each_style_draws_differently_within_the_bounding_circle(shape):
    images = {}
    for style in STYLES:
        obj = SceneObject(shape, "white", "small", "center", 0.01, -0.01, 0.95, style)
        img = np.asarray(render_scene(Scene("black", (obj,)), 32)).astype(int)
        cx, cy, r = object_geometry(obj, 32)
        yy, xx = np.mgrid[:32, :32] + 0.5
        outside = (xx - cx) ** 2 + (yy - cy) ** 2 > (r + 1) ** 2
        assert (img[outside] == BACKGROUNDS["black"]).all(), style
        assert (img != BACKGROUNDS["black"]).any(), style
        images[style] = img
    for a in STYLES:
        for b in STYLES:
            if a < b:
                assert np.abs(images[a] - images[b]).sum() > 0, (a, b)


# ----------------------------------------------------------------------------- hint maps


def test_silhouette_hint_is_white_exactly_where_objects_are():
    scenes = sample_scenes(30, 5, "test", objects=DRAWABLE, styles=STYLES)
    for scene in scenes:
        hint = np.asarray(render_hint(scene, 32))
        assert hint.shape == (32, 32, 3) and (hint[..., 0] == hint[..., 1]).all()
        # The same objects, solid and white on black: drawn wherever the hint is not black.
        solid = Scene("black", tuple(dataclasses.replace(o, colour="white", style=DEFAULT_STYLE) for o in scene.objects))
        drawn = (np.asarray(render_scene(solid, 32)) != BACKGROUNDS["black"]).any(-1)
        assert ((hint[..., 0] > 0) == drawn).all()
        # Colours, styles and background do not change it.
        assert (np.asarray(render_hint(solid, 32)) == hint).all()


def test_box_hint_covers_each_object_at_its_place():
    for scene in sample_scenes(20, 5, "test", n_objects=2):
        box = np.asarray(render_hint(scene, 64, kind="box"))[..., 0]
        silhouette = np.asarray(render_hint(scene, 64))[..., 0]
        assert ((silhouette > 0) <= (box > 0)).all()
        yy, xx = np.mgrid[:64, :64] + 0.5
        near = np.zeros((64, 64), dtype=bool)
        for obj in scene.objects:
            cx, cy, r = object_geometry(obj, 64)
            assert box[int(cy), int(cx)] == 255
            near |= (np.abs(xx - cx) < r + 1) & (np.abs(yy - cy) < r + 1)
        assert (box[~near] == 0).all()


def test_hint_kind_is_checked():
    with pytest.raises(PolyBridgeError, match=str(list(HINT_KINDS)).replace("[", r"\[").replace("]", r"\]")):
        render_hint(sample_scenes(1, 0)[0], kind="depth")


# ----------------------------------------------------------------------------- the unnamed object


def test_no_language_names_the_unnamed_objects(grammars):
    """Every grammar captions an unnamed object exactly as a concept it does not own: as its word for 'object'."""
    assert grammars and set(UNNAMED_OBJECTS).isdisjoint(OBJECTS)
    scenes = sample_scenes(40, 2, "test", objects=UNNAMED_OBJECTS + SHAPES)
    assert any(o.is_unnamed for s in scenes for o in s.objects)
    for code, grammar in grammars.items():
        foreign = next(c for c in CONCEPTS if c not in grammar.concepts)
        for unnamed in UNNAMED_OBJECTS:
            assert grammar.noun_key(unnamed) == OBJECT
            assert grammar.surface_forms("shape", unnamed) == grammar.surface_forms("shape", OBJECT)
        for i, scene in enumerate(scenes):
            as_foreign = Scene(scene.background, tuple(
                dataclasses.replace(o, shape=foreign) if o.is_unnamed else o for o in scene.objects))
            assert grammar.caption(scene, random.Random(i)) == grammar.caption(as_foreign, random.Random(i)), code


def test_a_grammar_naming_an_unnamed_object_is_refused(tmp_path):
    reg = load_registry()
    entry = reg.language("en")
    data = yaml.safe_load(entry.grammar_path.read_text(encoding="utf-8"))
    data["words"]["shape"][UNNAMED_OBJECTS[0]] = ["thing"]
    path = tmp_path / "grammar.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(GrammarError, match=f"words.shape.{UNNAMED_OBJECTS[0]}.*no language names"):
        load_grammar(path, "en", entry.synthetic.concepts)


def test_unnamed_objects_are_sampled_only_when_asked():
    scenes = sample_scenes(60, 1, "train", objects=UNNAMED_OBJECTS)
    assert {o.shape for s in scenes for o in s.objects} == set(UNNAMED_OBJECTS)
    with pytest.raises(PolyBridgeError, match="not drawable"):
        sample_scenes(2, 1, objects=["unicorn"])


# ----------------------------------------------------------------------------- the plugin scorer


def test_plugin_scorer_starts_as_the_scene_scorer(default_scorer):
    """Built from the scene scorer, the plugin scorer reads default scenes exactly as it does (its style aside)."""
    model = PluginScorer.from_scene_scorer(default_scorer).eval()
    images = [render_scene(s) for s in sample_scenes(48, 9, "test")]
    without_style = [{**p, "objects": [{k: v for k, v in o.items() if k != "style"} for o in p["objects"]]}
                     for p in model.predict(images)]
    assert without_style == default_scorer.predict(images)


def test_committed_plugin_scorer_reads_fresh_scenes():
    """A cheap check that the committed weights load and work; the figures are in its README."""
    scorer = load_plugin_scorer()
    scenes = sample_scenes(40, 11, "test", objects=DRAWABLE, styles=STYLES)
    scenes += sample_scenes(24, 11, "test", objects=UNNAMED_OBJECTS + SHAPES)
    m = scorer.score([render_scene(s) for s in scenes], scenes)
    assert m["n_unnamed"] > 0
    for key in ("style", "unnamed", "unnamed_recall", "unnamed_colour", "position", "colour"):
        assert m[key] >= 0.9, (key, m[key])


def test_scorer_formats_do_not_mix(tmp_path, default_scorer):
    PluginScorer.from_scene_scorer(default_scorer).save_pretrained(tmp_path / "plugin")
    with pytest.raises(ScorerError, match="polybridge-plugin-scorer"):
        SceneScorer.from_pretrained(tmp_path / "plugin")
    assert PluginScorer.from_pretrained(tmp_path / "plugin").config["styles"] == list(STYLES)
    default_scorer.save_pretrained(tmp_path / "scene")
    with pytest.raises(ScorerError, match="build_plugin_scorer"):
        PluginScorer.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ScorerError, match="format"):
        PluginScorer.from_pretrained(tmp_path / "scene")


def test_plugin_targets_and_scoring():
    scene = Scene("navy", (SceneObject("kite", "red", "small", "left", style="outline"),
                           SceneObject("star", "blue", "large", "right", style="dotted")))
    t = scene_targets([scene], DRAWABLE, PluginScorer.OBJECT_ATTRIBUTES)
    assert t["objects"][0].tolist() == [DRAWABLE.index("kite"), DRAWABLE.index("star"), len(DRAWABLE), len(DRAWABLE),
                                        len(DRAWABLE)]
    assert t["style"][0].tolist() == [STYLES.index("outline"), STYLES.index("dotted"), -100, -100, -100]
    truth = scene.to_dict()
    right = {"background": "navy", "objects": truth["objects"]}
    m = score_plugin_predictions([right], [scene])
    assert (m["style"], m["unnamed"], m["unnamed_recall"], m["unnamed_colour"], m["unnamed_position"]) == (1, 1, 1, 1, 1)
    # The kite read as a star, and a kite read where there is none: both wrong.
    wrong = {"background": "navy", "objects": [{**truth["objects"][0], "shape": "star"},
                                               {**truth["objects"][1], "shape": "kite", "style": "solid"}]}
    m = score_plugin_predictions([wrong], [scene])
    assert (m["style"], m["unnamed"], m["unnamed_recall"]) == (0.5, 0, 0)
