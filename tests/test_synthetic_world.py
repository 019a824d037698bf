"""The synthetic world: scene sampling, rendering, on-disk / HF datasets and the ground-truth scorer."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from polybridge.synthetic.dataset import build_dataset, plain_caption, render_to_dir, scene_record
from polybridge.synthetic.render import dark_shade, light_tint, object_geometry, render_scene
from polybridge.synthetic.scenes import (
    HELDOUT_PAIRS,
    MAX_SHIFT,
    SCALE_RANGE,
    is_heldout,
    sample_scene,
    sample_scenes,
)
from polybridge.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    OBJECTS,
    POSITION_PAIRS,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
)

# ----------------------------------------------------------------------------- scenes


def test_sampling_is_deterministic_and_prefix_stable():
    assert sample_scenes(10, 3) == sample_scenes(10, 3)
    assert sample_scenes(10, 3)[:5] == sample_scenes(5, 3)
    assert sample_scenes(4, 3, start=6) == sample_scenes(10, 3)[6:]
    assert sample_scenes(10, 3) != sample_scenes(10, 4)
    train, val, test = (sample_scenes(50, 3, split) for split in ("train", "validation", "test"))
    assert train != val != test != train


def test_scene_contents_follow_the_world():
    scenes = sample_scenes(2000, 0, "test")
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2} and 0.4 < counts[1] / len(scenes) < 0.6
    seen_objects = Counter()
    for s in scenes:
        assert s.background in BACKGROUNDS
        if len(s.objects) == 2:
            pair = (s.objects[0].position, s.objects[1].position)
            assert pair in POSITION_PAIRS or pair[::-1] in POSITION_PAIRS
        for o in s.objects:
            seen_objects[o.shape] += 1
            assert o.colour in COLOURS and o.position in POSITIONS
            assert abs(o.dx) <= MAX_SHIFT and abs(o.dy) <= MAX_SHIFT
            assert SCALE_RANGE[0] <= o.scale <= SCALE_RANGE[1]
            assert round(o.dx, 4) == o.dx and round(o.scale, 4) == o.scale
    assert set(seen_objects) == set(OBJECTS)
    # Scenes survive a JSON round trip exactly (render_to_dir relies on it).
    assert [Scene.from_dict(json.loads(json.dumps(s.to_dict()))) for s in scenes[:50]] == scenes[:50]


def test_sampling_options():
    only_zh = sample_scenes(300, 1, concepts=["lantern", "pagoda"])
    assert {o.shape for s in only_zh for o in s.objects} == set(SHAPES) | {"lantern", "pagoda"}
    assert all(len(s.objects) == 2 for s in sample_scenes(20, 1, n_objects=2))
    assert {o.shape for s in sample_scenes(20, 1, objects=["torii"]) for o in s.objects} == {"torii"}
    with pytest.raises(ValueError, match="concepts"):
        sample_scenes(5, 1, concepts=["unicorn"])
    with pytest.raises(ValueError, match="split"):
        sample_scenes(5, 1, split="dev")
    with pytest.raises(ValueError, match="n_objects"):
        sample_scene(random.Random(0), "train", n_objects=3)


def test_heldout_pairs_cover_every_object_and_colour():
    assert 0.12 < len(HELDOUT_PAIRS) / (len(OBJECTS) * len(COLOURS)) < 0.2
    assert {o for o, _ in HELDOUT_PAIRS} == set(OBJECTS)
    assert {c for _, c in HELDOUT_PAIRS} == set(COLOURS)


def test_heldout_pairs_never_in_train_but_in_test():
    train = sample_scenes(3000, 7, "train")
    assert not any(is_heldout(s) for s in train)
    test = sample_scenes(3000, 7, "test")
    test_pairs = {(o.shape, o.colour) for s in test for o in s.objects}
    assert sum(is_heldout(s) for s in test) > 300
    assert len(HELDOUT_PAIRS & test_pairs) > len(HELDOUT_PAIRS) * 0.9


# ----------------------------------------------------------------------------- rendering


def test_rendering_is_deterministic_and_sized():
    for scene in sample_scenes(20, 2, "test"):
        a, b = render_scene(scene), render_scene(scene)
        assert a.mode == "RGB" and a.size == (32, 32)
        assert a.tobytes() == b.tobytes()
    assert render_scene(sample_scenes(1, 2)[0], 64).size == (64, 64)


def _object_pixels(obj: SceneObject, size: int) -> np.ndarray:
    """Pixels that differ from the background when ``obj`` is drawn alone."""
    img = np.asarray(render_scene(Scene("black", (obj,)), size), dtype=np.int16)
    return np.abs(img - np.array(BACKGROUNDS["black"])).sum(-1) > 0


def test_two_objects_never_overlap():
    scenes = [s for s in sample_scenes(400, 5, "test") if len(s.objects) == 2][:120]
    for s in scenes:
        a, b = s.objects
        (ax, ay, ar), (bx, by, br) = object_geometry(a, 1), object_geometry(b, 1)
        assert math.hypot(ax - bx, ay - by) >= ar + br, s
        assert not (_object_pixels(a, 32) & _object_pixels(b, 32)).any(), s
    # The tightest case: two large objects at full scale with jitter towards each other.
    big = [SceneObject("circle", "white", "large", p, dx=0.03 * sgn, scale=1.08) for p, sgn in (("left", 1), ("right", -1))]
    sampled = sample_scenes(2000, 9, n_objects=2)
    assert all(_clear_pair(s) for s in sampled)
    assert not _clear_pair(Scene("black", tuple(big)))


def _clear_pair(scene: Scene) -> bool:
    (ax, ay, ar), (bx, by, br) = (object_geometry(o, 1) for o in scene.objects)
    return math.hypot(ax - bx, ay - by) >= ar + br


@pytest.mark.parametrize("shape", OBJECTS)
def test_object_stays_in_its_bounding_circle_and_shows_its_colour(shape):
    size = 128
    obj = SceneObject(shape, "red", "large", "center", 0.02, -0.01, 1.05)
    cx, cy, r = object_geometry(obj, size)
    mask = _object_pixels(obj, size)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0
    assert np.hypot(xs + 0.5 - cx, ys + 0.5 - cy).max() <= r + 1.0
    # The object colour is the most common of its three inks, for every colour.
    for colour, rgb in COLOURS.items():
        img = np.asarray(render_scene(Scene("black", (SceneObject(shape, colour, "large", "center"),)), size))
        flat = img.reshape(-1, 3)
        count = {ink: int((flat == np.array(c)).all(1).sum()) for ink, c in
                 (("main", rgb), ("dark", dark_shade(rgb)), ("light", light_tint(rgb)))}
        assert count["main"] > max(count["dark"], count["light"]), (shape, colour, count)


def test_objects_are_distinct_at_32px():
    """No two objects render to the same 32 px silhouette (a cheap guard against a broken drawing)."""
    masks = {o: _object_pixels(SceneObject(o, "white", "large", "center"), 32) for o in OBJECTS}
    for i, a in enumerate(OBJECTS):
        for b in OBJECTS[i + 1:]:
            assert (masks[a] ^ masks[b]).sum() >= 6, (a, b)


# ----------------------------------------------------------------------------- datasets


def test_scene_record():
    scene = Scene("gray", (SceneObject("torii", "red", "small", "left"), SceneObject("circle", "blue", "large", "right")))
    rec = scene_record(scene)
    assert rec["background"] == "gray" and rec["n_objects"] == 2
    assert rec["objects"][0] == {"shape": "torii", "colour": "red", "size": "small", "position": "left", "is_concept": True}
    assert rec["heldout"] == is_heldout(scene)


def test_build_dataset_columns():
    import datasets

    def shout(scene, lang, rng):
        return f"{lang}:{rng.randint(0, 9)}:" + plain_caption(scene)

    ds = build_dataset(12, 4, "validation", size=32, languages=["en", "zz"], captioner=shout)
    assert len(ds) == 12
    assert {"image", "caption_en", "caption_zz", "background", "n_objects", "objects", "heldout", "scene"} <= set(ds.column_names)
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[3]
    scene = Scene.from_dict(json.loads(row["scene"]))
    assert scene == sample_scenes(12, 4, "validation")[3]
    assert row["image"].size == (32, 32)
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(render_scene(scene)))
    assert row["caption_en"].startswith("en:") and row["caption_zz"].startswith("zz:")
    assert row["objects"] == scene_record(scene)["objects"]
    again = build_dataset(12, 4, "validation", languages=["zz"], captioner=shout)
    assert again["caption_zz"] == ds["caption_zz"]  # caption rng depends on (seed, split, index, lang) only
    with pytest.raises(ValueError, match="captioner"):
        build_dataset(3, 0, languages=["en"])
    with pytest.raises(ValueError, match="n="):
        build_dataset(0, 0)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_render_to_dir_writes_everything(tmp_path):
    out = render_to_dir(tmp_path / "out", 6, 1, "test", size=32, lang="en", captioner=plain_caption)
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{i:06d}.png" for i in range(6)] + ["meta.json", "scenes.jsonl"]
    lines = [json.loads(line) for line in (out / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]
    scenes = sample_scenes(6, 1, "test")
    for i, rec in enumerate(lines):
        assert rec["file"] == f"{i:06d}.png" and rec["lang"] == "en"
        assert Scene.from_dict(rec["scene"]) == scenes[i]
        assert rec["caption"] == plain_caption(scenes[i])
        assert rec["background"] == scenes[i].background and rec["heldout"] == is_heldout(scenes[i])
    assert _leftovers(tmp_path) == []


def test_render_to_dir_refuses_bad_input(tmp_path):
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n="):
            render_to_dir(tmp_path / "x", bad, 0)
    assert not (tmp_path / "x").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="a_file"):
        render_to_dir(blocker / "out", 2, 0)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        render_to_dir(full, 2, 0)
    assert (full / "keep.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    render_to_dir(tmp_path / "empty", 2, 0)  # an existing empty folder is fine
    render_to_dir(full, 3, 0, overwrite=True)
    assert not (full / "keep.txt").exists() and (full / "000002.png").exists()
    assert _leftovers(tmp_path) == []


def test_render_to_dir_is_atomic_on_failure(tmp_path):
    calls = []

    def flaky(scene, lang, rng):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("captioner broke")
        return "ok"

    with pytest.raises(RuntimeError, match="captioner broke"):
        render_to_dir(tmp_path / "new", 10, 0, lang="en", captioner=flaky)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []
    old = render_to_dir(tmp_path / "old", 2, 0)
    before = sorted(p.name for p in old.iterdir())
    calls.clear()
    with pytest.raises(RuntimeError):
        render_to_dir(old, 10, 0, lang="en", captioner=flaky, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == before
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- scorer


def test_scorer_roundtrip_and_mismatch(tmp_path):
    import torch

    from polybridge.synthetic.scorer import SceneScorer, ScorerError

    torch.manual_seed(0)
    model = SceneScorer(32, widths=(4, 4, 8, 8), hidden=8).eval()
    model.save_pretrained(tmp_path / "s")
    loaded = SceneScorer.from_pretrained(tmp_path / "s")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x)["objects"], loaded(x)["objects"], atol=0.05)
    assert len(loaded.predict(x)) == 3
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["objects"] = config["objects"][:-1]
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScorerError, match=r"config\.json.*objects"):
        SceneScorer.from_pretrained(tmp_path / "s")
    with pytest.raises(ScorerError, match="build_scorer"):
        SceneScorer.from_pretrained(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def default_scorer():
    from polybridge.synthetic.scorer import DEFAULT_SCORER_DIR, WEIGHTS_NAME, load_default_scorer

    if not (DEFAULT_SCORER_DIR / WEIGHTS_NAME).is_file():
        pytest.skip(f"{DEFAULT_SCORER_DIR / WEIGHTS_NAME} is absent; build it with `python scripts/build_scorer.py`")
    return load_default_scorer()


def test_default_scorer_accuracy(default_scorer):
    scenes = sample_scenes(300, 2024, "test")
    images = [render_scene(s) for s in scenes]
    result = default_scorer.score(images, scenes)
    for key in ("background", "shape", "colour", "size", "position", "shape_generic", "shape_concept"):
        assert result[key] >= 0.98, (key, result[key], result)
    assert result["n_images"] == 300 and result["n_objects"] > 300


def test_default_scorer_reads_heldout_pairs(default_scorer):
    """Held-out (object, colour) pairs were never in the scorer's training data; it must still read them."""
    scenes = [s for s in sample_scenes(1500, 77, "test") if is_heldout(s)][:200]
    result = default_scorer.score([render_scene(s) for s in scenes], scenes)
    assert result["shape"] >= 0.97 and result["colour"] >= 0.97, result


def test_colour_blind_view_hides_colour():
    import torch

    from polybridge.synthetic.scorer import colour_blind

    def view(colour: str) -> torch.Tensor:
        img = render_scene(Scene("brown", (SceneObject("guitar", colour, "large", "center"),)))
        return colour_blind(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None])[0]

    white = view("white")
    for colour in COLOURS:
        assert (view(colour) - white).abs().mean() < 0.03, colour


def test_score_dir(default_scorer, tmp_path):
    out = render_to_dir(tmp_path / "d", 30, 11, "test", size=64)  # another size: resized with a warning
    with pytest.warns(UserWarning, match="resizing"):
        result = default_scorer.score_dir(out)
    assert result["n_images"] == 30 and result["background"] >= 0.9
    from polybridge.synthetic.scorer import ScorerError

    (out / "000003.png").write_bytes(b"not a png")
    with pytest.raises(ScorerError, match="000003.png"):
        default_scorer.score_dir(out)
    (out / "000003.png").unlink()
    with pytest.raises(ScorerError, match="000003.png"):
        default_scorer.score_dir(out)
    (out / "scenes.jsonl").unlink()
    with pytest.raises(ScorerError, match="scenes.jsonl"):
        default_scorer.score_dir(out)
