"""Seeded scene sampling, with held-out (object, colour) pairs that never appear in training.

Every scene is drawn from its own ``random.Random`` seeded by ``(seed, split, index)``, so a
dataset's scene ``i`` does not depend on how many scenes were asked for (a prefix of a larger
sample is identical to a smaller sample), and the three splits never share a seed stream.

Held-out pairs follow a Latin-square rule: object ``OBJECTS[i]`` is held out with colour
``COLOUR_NAMES[i % 6]`` (one pair per object, 23 of the 138 pairs, about 1 in 6; every colour
is held out with 3 or 4 objects). The training split never contains them; validation and test
draw from all pairs, so a model that only memorised seen combinations fails there.

What plugins need is drawn only when asked for, and never from a scene's own stream, so every default
scene stays what it always was: ``objects=`` may name the :data:`UNNAMED_OBJECTS` (no held-out pair:
their word is what a plugin teaches, not a combination), and ``styles=`` draws each object's style from
a private stream (:func:`scene_rng`, purpose ``style``), so styled scene ``i`` is default scene ``i``
with only its styles changed.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

from polybridge.errors import PolyBridgeValueError
from polybridge.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    DRAWABLE,
    OBJECTS,
    POSITION_PAIRS,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    STYLES,
    Scene,
    SceneObject,
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

#: (object, colour) pairs never sampled in the "train" split (Latin-square rule, see module doc).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (obj, COLOUR_NAMES[i % len(COLOUR_NAMES)]) for i, obj in enumerate(OBJECTS)
)

#: Jitter bounds stored on each SceneObject (fractions of the image side; scale factor).
MAX_SHIFT: float = 0.03
SCALE_RANGE: tuple[float, float] = (0.92, 1.08)

#: Minimum gap between the bounding circles of two objects (fraction of the image side), so that
#: even antialiased edges of a two-object scene never touch.
MIN_GAP: float = 0.01


def is_heldout(scene: Scene) -> bool:
    """True if any object of ``scene`` is a held-out (object, colour) pair."""
    return any((o.shape, o.colour) in HELDOUT_PAIRS for o in scene.objects)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise PolyBridgeValueError(f"split={split!r} is not valid; use one of {list(SPLITS)}")


def _resolve_pool(concepts: Sequence[str] | None, objects: Sequence[str] | None) -> tuple[str, ...]:
    """The object ids a sample may draw from, in world order (so the pool is independent of argument order)."""
    if concepts is not None and objects is not None:
        raise PolyBridgeValueError("give either concepts= (generic shapes plus these concepts) or objects= (exactly these), not both")
    if objects is not None:
        wanted = set(objects)
        unknown = sorted(wanted - set(DRAWABLE))
        if unknown:
            raise PolyBridgeValueError(f"objects={unknown} are not drawable; valid ids: {list(DRAWABLE)}")
        if not wanted:
            raise PolyBridgeValueError("objects= is empty; give at least one id of DRAWABLE")
        return tuple(o for o in DRAWABLE if o in wanted)
    if concepts is not None:
        wanted = set(concepts)
        unknown = sorted(wanted - set(CONCEPTS))
        if unknown:
            raise PolyBridgeValueError(f"concepts={unknown} are not concepts; valid ids: {list(CONCEPTS)}")
        return SHAPES + tuple(c for c in CONCEPTS if c in wanted)
    return OBJECTS


def _resolve_styles(styles: Sequence[str] | None) -> tuple[str, ...] | None:
    """The styles a sample may draw from, in world order; None: every object is solid (no draws at all)."""
    if styles is None:
        return None
    if isinstance(styles, str):
        raise PolyBridgeValueError(f"styles={styles!r} must be a list of styles, e.g. [{styles!r}]")
    wanted = set(styles)
    unknown = sorted(wanted - set(STYLES))
    if unknown:
        raise PolyBridgeValueError(f"styles={unknown} are not styles; valid: {list(STYLES)}")
    if not wanted:
        raise PolyBridgeValueError(f"styles= is empty; give at least one of {list(STYLES)}")
    return tuple(s for s in STYLES if s in wanted)


def with_styles(scene: Scene, styles: Sequence[str], rng: random.Random) -> Scene:
    """``scene`` with each object's style drawn from ``styles`` with ``rng`` (nothing else changes)."""
    objects = tuple(dataclasses.replace(o, style=rng.choice(tuple(styles))) for o in scene.objects)
    return dataclasses.replace(scene, objects=objects)


def _colours_for(obj: str, split: str) -> tuple[str, ...]:
    if split == "train":
        return tuple(c for c in COLOUR_NAMES if (obj, c) not in HELDOUT_PAIRS)
    return COLOUR_NAMES


def _jitter(rng: random.Random) -> tuple[float, float, float]:
    dx = round(rng.uniform(-MAX_SHIFT, MAX_SHIFT), 4)
    dy = round(rng.uniform(-MAX_SHIFT, MAX_SHIFT), 4)
    scale = round(rng.uniform(*SCALE_RANGE), 4)
    return dx, dy, scale


def _clear(a: SceneObject, b: SceneObject) -> bool:
    """Bounding circles (diameter SIZE_FRACTION * scale) of ``a`` and ``b`` are at least MIN_GAP apart."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    dist = math.hypot((ax + a.dx) - (bx + b.dx), (ay + a.dy) - (by + b.dy))
    reach = (SIZE_FRACTION[a.size] * a.scale + SIZE_FRACTION[b.size] * b.scale) / 2
    return dist >= reach + MIN_GAP


def sample_scene(
    rng: random.Random,
    split: str,
    n_objects: int | None = None,
    pool: Sequence[str] = OBJECTS,
) -> Scene:
    """One scene drawn from ``rng``; ``pool`` restricts which object ids may appear."""
    _check_split(split)
    if n_objects is None:
        n_objects = rng.choice((1, 2))
    if n_objects not in (1, 2):
        raise PolyBridgeValueError(f"n_objects={n_objects!r} is not valid; use 1, 2 or None (random)")
    background = rng.choice(BACKGROUND_NAMES)
    if n_objects == 1:
        positions: tuple[str, ...] = (rng.choice(tuple(POSITIONS)),)
    else:
        pair = rng.choice(POSITION_PAIRS)
        positions = pair if rng.random() < 0.5 else (pair[1], pair[0])
    kinds = []
    for position in positions:
        shape = rng.choice(tuple(pool))
        colour = rng.choice(_colours_for(shape, split))
        size = rng.choice(SIZES)
        kinds.append((shape, colour, size, position))
    # Two large objects at full scale and inward jitter would touch; redraw the jitter until the
    # bounding circles are clear. Scale 0.92 with zero jitter always fits, which ends the loop.
    for attempt in range(64):
        objs = []
        for shape, colour, size, position in kinds:
            dx, dy, scale = _jitter(rng) if attempt < 63 else (0.0, 0.0, SCALE_RANGE[0])
            objs.append(SceneObject(shape, colour, size, position, dx, dy, scale))
        if len(objs) == 1 or _clear(objs[0], objs[1]):
            break
    return Scene(background=background, objects=tuple(objs))


def sample_scenes(
    n: int,
    seed: int,
    split: str = "train",
    n_objects: int | None = None,
    concepts: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
    start: int = 0,
    styles: Sequence[str] | None = None,
) -> list[Scene]:
    """Scenes ``start .. start+n-1`` of the stream ``(seed, split)``.

    ``concepts`` keeps the generic shapes and only these concepts (e.g. one language's own);
    ``objects`` keeps exactly these ids (any of :data:`DRAWABLE`, the unnamed objects included).
    ``start`` lets a caller fetch any window of the stream, since scene ``i`` depends only on
    ``(seed, split, i)`` and the arguments, never on ``n``. ``styles`` (ids of :data:`STYLES`) gives
    each object a style drawn from these, uniformly; by default every object is ``solid``.
    """
    _check_split(split)
    if n < 0:
        raise PolyBridgeValueError(f"n={n} must be >= 0")
    pool = _resolve_pool(concepts, objects)
    style_pool = _resolve_styles(styles)
    scenes = [
        sample_scene(random.Random(f"polybridge-scene:{seed}:{split}:{i}"), split, n_objects, pool)
        for i in range(start, start + n)
    ]
    if style_pool is None:
        return scenes
    return [with_styles(s, style_pool, scene_rng(seed, split, i, "style")) for i, s in enumerate(scenes, start)]


def scene_rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    """A private rng for something derived from scene ``index`` (a caption in one language, say).

    Separate from the scene's own stream, so adding a consumer never changes the scenes.
    """
    return random.Random(f"polybridge-{purpose}:{seed}:{split}:{index}")
