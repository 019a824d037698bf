"""Render a :class:`~polybridge.synthetic.world.Scene` to a small RGB image.

Rendering is a pure function of ``(scene, size)``: the scene already carries its jitter, so the
same scene always gives the same bytes, and the scorer can be trained on scenes it regenerates.

Each object is drawn in its own unit circle (``x, y`` in ``[-1, 1]``, y down) whose diameter is
``SIZE_FRACTION[size] * scale * size`` pixels; nothing is drawn outside that circle, which is what
keeps two-object scenes from overlapping (the sampler keeps the circles apart). The scene is drawn
with palette indices at ``SUPERSAMPLE`` times the size and box-filtered down, which gives clean
antialiased edges at 32 px. Objects use three inks: the object colour (always the dominant one, so
"a red pagoda" is well defined), a dark shade (colour * 0.45) and a light tint (halfway to white).

An object's ``style`` (:data:`~polybridge.synthetic.world.STYLES`) changes how its drawing is inked:
``solid`` is the drawing itself (the default: every default scene takes exactly the code path it always
took); ``outline`` is a ring in the object colour just outside the silhouette, the inside cleared (still
within the bounding circle); ``striped`` cuts the drawing into horizontal bands; ``dotted`` keeps it only
inside a grid of dots. Patterns are aligned to the output pixel grid so they stay crisp at 32 px.

:func:`render_hint` draws a scene's hint map for a ControlNet: every object's silhouette (or its box)
in white on black, the same size as the image, whatever the objects' colours and styles.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from polybridge.errors import PolyBridgeValueError
from polybridge.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    DEFAULT_STYLE,
    DRAWABLE,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    STYLES,
    UNNAMED_OBJECTS,
    Scene,
    SceneObject,
)

#: Drawing resolution multiplier; 4x gives 16 coverage levels per output pixel.
SUPERSAMPLE: int = 4

# Inks inside one object, as offsets into that object's palette slots. ERASE paints the
# background back (holes, cut-outs); it is only ever used inside the object's own unit circle.
MAIN, DARK, LIGHT, ERASE = 1, 2, 3, 0

Point = tuple[float, float]


def dark_shade(rgb: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(round(c * 0.45)) for c in rgb)  # type: ignore[return-value]


def light_tint(rgb: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(round((c + 255) / 2)) for c in rgb)  # type: ignore[return-value]


class _Pen:
    """Draws in an object's unit circle onto the scene's palette image."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, slot: int) -> None:
        self.draw, self.cx, self.cy, self.r, self.slot = draw, cx, cy, radius, slot

    def _ink(self, ink: int) -> int:
        return 0 if ink == ERASE else self.slot + ink - 1

    def _xy(self, p: Point) -> tuple[float, float]:
        return (self.cx + p[0] * self.r, self.cy + p[1] * self.r)

    def poly(self, points: Sequence[Point], ink: int = MAIN) -> None:
        self.draw.polygon([self._xy(p) for p in points], fill=self._ink(ink))

    def ellipse(self, x: float, y: float, rx: float, ry: float, ink: int = MAIN) -> None:
        x0, y0 = self._xy((x - rx, y - ry))
        x1, y1 = self._xy((x + rx, y + ry))
        # PIL's ellipse box is inclusive; shrink by one supersampled pixel so the ellipse's
        # extent matches the unit-circle geometry.
        self.draw.ellipse((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), fill=self._ink(ink))

    def circle(self, x: float, y: float, r: float, ink: int = MAIN) -> None:
        self.ellipse(x, y, r, r, ink)

    def rect(self, x0: float, y0: float, x1: float, y1: float, ink: int = MAIN) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], ink)

    def line(self, a: Point, b: Point, width: float, ink: int = MAIN) -> None:
        """A stroke of ``width`` (unit-circle units) drawn as a quad, so it scales with the object."""
        (ax, ay), (bx, by) = a, b
        length = math.hypot(bx - ax, by - ay) or 1.0
        nx, ny = -(by - ay) / length * width / 2, (bx - ax) / length * width / 2
        self.poly([(ax + nx, ay + ny), (bx + nx, by + ny), (bx - nx, by - ny), (ax - nx, ay - ny)], ink)


# --------------------------------------------------------------------------- geometry helpers


def _arc(x: float, y: float, rx: float, ry: float, a0: float, a1: float, n: int = 16) -> list[Point]:
    """Points on an ellipse from angle ``a0`` to ``a1`` (degrees, 0 = +x, 90 = down)."""
    return [
        (x + rx * math.cos(math.radians(a0 + (a1 - a0) * i / n)), y + ry * math.sin(math.radians(a0 + (a1 - a0) * i / n)))
        for i in range(n + 1)
    ]


def _rotate(points: Sequence[Point], degrees: float) -> list[Point]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _star(n: int, r_out: float, r_in: float, rot: float = -90.0) -> list[Point]:
    return [
        ((r_out if i % 2 == 0 else r_in) * math.cos(math.radians(rot + i * 180 / n)),
         (r_out if i % 2 == 0 else r_in) * math.sin(math.radians(rot + i * 180 / n)))
        for i in range(2 * n)
    ]


def _crescent(r_out: float, cx: float, cy: float, r_in: float, n: int = 24) -> list[Point]:
    """Boundary of the disc (0, 0, r_out) minus the disc (cx, cy, r_in), as one polygon."""
    d = math.hypot(cx, cy)
    # Intersection of the two circles: angle on each circle, measured from the centre line.
    a = (r_out**2 - r_in**2 + d**2) / (2 * d)
    base = math.degrees(math.atan2(cy, cx))
    half_out = math.degrees(math.acos(max(-1.0, min(1.0, a / r_out))))
    half_in = math.degrees(math.acos(max(-1.0, min(1.0, (d - a) / r_in))))
    outer = _arc(0, 0, r_out, r_out, base + half_out, base + 360 - half_out, n)
    # Inner arc runs back through the side of the small disc that faces the big disc's centre.
    inner = _arc(cx, cy, r_in, r_in, base + 180 + (180 - half_in), base + 180 - (180 - half_in), n)
    return outer + inner


# --------------------------------------------------------------------------- the objects


def _circle(p: _Pen) -> None:
    p.circle(0, 0, 0.92)


def _square(p: _Pen) -> None:
    p.rect(-0.68, -0.68, 0.68, 0.68)


def _triangle(p: _Pen) -> None:
    p.poly([(0, -0.97), (0.84, 0.485), (-0.84, 0.485)])


def _star5(p: _Pen) -> None:
    p.poly(_star(5, 1.0, 0.42))


def _cross(p: _Pen) -> None:
    w = 0.3
    p.rect(-w, -0.94, w, 0.94)
    p.rect(-0.94, -w, 0.94, w)


def _lantern(p: _Pen) -> None:
    p.rect(-0.05, -0.96, 0.05, -0.6)              # hanging cord
    p.ellipse(0, 0, 0.92, 0.62)                   # body
    p.ellipse(0, 0, 0.5, 0.6, DARK)               # two curved ribs ...
    p.ellipse(0, 0, 0.36, 0.6)                    # ... left by the body drawn over their middle
    p.rect(-0.42, -0.74, 0.42, -0.54, DARK)       # top cap
    p.rect(-0.42, 0.54, 0.42, 0.74, DARK)         # bottom cap
    p.poly([(-0.06, 0.74), (0.06, 0.74), (0.14, 0.98), (-0.14, 0.98)])  # tassel


def _pagoda(p: _Pen) -> None:
    p.rect(-0.05, -0.98, 0.05, -0.62)            # spire
    # (roof top y, roof bottom y, eave half-width, ridge half-width) per tier, top tier first.
    tiers = [(-0.62, -0.38, 0.5, 0.14), (-0.2, 0.06, 0.72, 0.3), (0.24, 0.5, 0.86, 0.44)]
    walls = [(-0.38, -0.2, 0.26), (0.06, 0.24, 0.4), (0.5, 0.84, 0.5)]
    for w0, w1, wh in walls:
        p.rect(-wh, w0, wh, w1, DARK)
    for y0, y1, half, top in tiers:
        p.poly([(-top, y0), (top, y0), (half, y1), (-half, y1)])
        p.poly([(-half, y1), (-half - 0.06, y1 - 0.12), (-half + 0.1, y1)])
        p.poly([(half, y1), (half + 0.06, y1 - 0.12), (half - 0.1, y1)])


def _torii(p: _Pen) -> None:
    p.poly([(-0.76, -0.62), (0.76, -0.62), (0.68, -0.44), (-0.68, -0.44)])  # kasagi (top lintel)
    p.rect(-0.72, -0.68, 0.72, -0.58, DARK)
    p.rect(-0.64, -0.24, 0.64, -0.08)                                      # nuki (second bar)
    for x in (-0.44, 0.44):
        p.rect(x - 0.11, -0.46, x + 0.11, 0.8)                            # posts
    p.rect(-0.06, -0.46, 0.06, -0.24)                                       # gakuzuka (centre strut)


def _daruma(p: _Pen) -> None:
    p.ellipse(0, 0.04, 0.86, 0.94)
    p.ellipse(0, -0.18, 0.52, 0.42, LIGHT)   # face
    p.circle(-0.22, -0.26, 0.12, DARK)       # eyes
    p.circle(0.22, -0.26, 0.12, DARK)
    p.rect(-0.26, 0.0, 0.26, 0.08, DARK)     # moustache
    p.rect(-0.5, 0.5, 0.5, 0.6, DARK)        # belt line


def _taegeuk(p: _Pen) -> None:
    p.circle(0, 0, 0.97)                           # rim in the colour, so the dark half keeps its outline
    p.circle(0, 0, 0.85, DARK)
    p.poly(_arc(0, 0, 0.85, 0.85, 180, 360, 24))   # upper half in the colour
    p.circle(-0.425, 0, 0.425)                     # colour lobe spills into the lower half
    p.circle(0.425, 0, 0.425, DARK)                # dark lobe pushes into the upper half


def _gat(p: _Pen) -> None:
    p.ellipse(0, 0.3, 0.93, 0.16)                   # brim
    p.poly([(-0.36, 0.3), (-0.3, -0.78), (0.3, -0.78), (0.36, 0.3)])  # crown
    p.rect(-0.36, 0.06, 0.36, 0.2, DARK)           # band
    p.poly([(-0.06, 0.46), (0.06, 0.46), (0.04, 0.9), (-0.04, 0.9)], DARK)  # chin string hint


def _matryoshka(p: _Pen) -> None:
    p.ellipse(0, 0.3, 0.72, 0.66)                  # body
    p.circle(0, -0.5, 0.46)                         # head
    p.circle(0, -0.46, 0.28, LIGHT)                 # face
    p.ellipse(0, 0.38, 0.32, 0.32, LIGHT)           # apron
    p.circle(0, 0.38, 0.14, DARK)                   # flower on the apron


def _onion_dome(p: _Pen) -> None:
    p.rect(-0.04, -0.99, 0.04, -0.66)               # spire
    p.rect(-0.17, -0.9, 0.17, -0.83)                # its cross bar
    right = [(0.24, 0.22), (0.5, 0.12), (0.68, -0.02), (0.74, -0.18), (0.68, -0.34), (0.52, -0.5),
             (0.32, -0.62), (0.14, -0.7), (0.0, -0.78)]
    p.poly(right + [(-x, y) for x, y in reversed(right[:-1])])  # bulb: bulging, pointed at the top
    p.rect(-0.4, 0.3, 0.4, 0.88)                    # drum
    p.rect(-0.48, 0.22, 0.48, 0.34)                 # cornice
    p.rect(-0.24, 0.2, 0.24, 0.3, DARK)             # shadow under the bulb's neck
    for x in (-0.19, 0.19):
        p.rect(x - 0.08, 0.46, x + 0.08, 0.76, DARK)  # windows


def _crescent_obj(p: _Pen) -> None:
    p.poly(_crescent(0.96, 0.4, -0.22, 0.78, 28))


def _khamsa(p: _Pen) -> None:
    p.ellipse(0, 0.36, 0.56, 0.56)                 # palm, round at the wrist
    p.rect(-0.56, -0.06, 0.56, 0.36)
    for x, top in ((-0.3, -0.72), (0.0, -0.9), (0.3, -0.72)):
        p.rect(x - 0.12, top + 0.12, x + 0.12, 0.0)
        p.circle(x, top + 0.12, 0.12)
    for side in (-1, 1):                            # two thumbs, splayed
        p.poly([(side * 0.42, 0.0), (side * 0.56, 0.12), (side * 0.88, -0.3), (side * 0.74, -0.4)])
    p.circle(0, 0.34, 0.22, LIGHT)                  # the eye
    p.circle(0, 0.34, 0.11, DARK)


def _fan(p: _Pen) -> None:
    pivot = (0.0, 0.46)
    p.poly([pivot] + _arc(0, 0.46, 0.98, 1.3, 200, 340, 24))  # blade, a sector wider than tall
    for a in range(214, 330, 16):                               # ribs
        end = (0.98 * math.cos(math.radians(a)) * 0.9, 0.46 + 1.3 * math.sin(math.radians(a)) * 0.9)
        p.line(pivot, end, 0.05, DARK)
    p.poly([pivot] + _arc(0, 0.46, 0.3, 0.36, 200, 340, 10), DARK)  # the guard where the ribs meet
    p.poly([(-0.08, 0.46), (0.08, 0.46), (0.06, 0.8), (-0.06, 0.8)], DARK)  # handle


def _guitar(p: _Pen) -> None:
    # Drawn upright, then tilted so the neck reads as a diagonal and it never looks like a doll.
    def tilted(points: Sequence[Point], ink: int = MAIN) -> None:
        p.poly(_rotate(points, 28), ink)

    tilted(_arc(0, 0.44, 0.52, 0.5, 0, 360, 24))            # lower lobe
    tilted(_arc(0, -0.08, 0.38, 0.34, 0, 360, 20))          # upper lobe
    tilted([(-0.32, 0.12), (0.32, 0.12), (0.4, 0.36), (-0.4, 0.36)])  # waist fill
    tilted(_arc(0, 0.2, 0.15, 0.15, 0, 360, 12), DARK)      # sound hole
    tilted([(-0.2, 0.58), (0.2, 0.58), (0.2, 0.68), (-0.2, 0.68)], DARK)  # bridge
    tilted([(-0.09, -0.3), (0.09, -0.3), (0.09, -0.78), (-0.09, -0.78)])  # neck
    tilted([(-0.14, -0.76), (0.14, -0.76), (0.12, -0.98), (-0.12, -0.98)], DARK)  # headstock


def _diya(p: _Pen) -> None:
    p.poly(_arc(0, 0.2, 0.92, 0.62, 0, 180, 20))  # bowl
    p.poly([(0.6, 0.2), (0.97, 0.08), (0.78, 0.4)])  # spout
    p.ellipse(0, 0.2, 0.92, 0.14, DARK)              # rim / oil
    p.poly([(0.0, -0.98)] + _arc(0, -0.16, 0.32, 0.3, -25, 205, 14), LIGHT)  # flame
    p.poly([(0.0, -0.56)] + _arc(0, -0.12, 0.15, 0.15, -25, 205, 8))          # its core


def _kalash(p: _Pen) -> None:
    p.circle(0, 0.38, 0.58)                          # pot
    p.rect(-0.2, -0.28, 0.2, 0.0)                    # neck
    p.ellipse(0, -0.28, 0.36, 0.1)                   # rim
    for a in (-145, -115, -65, -35):                 # mango leaves
        tip = (0.7 * math.cos(math.radians(a)), -0.3 + 0.7 * math.sin(math.radians(a)))
        p.poly([(0, -0.34), _mid(tip, -0.16, a), tip, _mid(tip, 0.16, a)], DARK)
    p.circle(0, -0.56, 0.22)                          # coconut
    p.rect(-0.5, 0.3, 0.5, 0.42, LIGHT)               # band on the pot


def _mid(tip: Point, offset: float, angle: float) -> Point:
    """A point half way to ``tip`` pushed sideways by ``offset``, for leaf outlines."""
    nx, ny = -math.sin(math.radians(angle)), math.cos(math.radians(angle))
    return (tip[0] * 0.5 + nx * offset, -0.32 + (tip[1] + 0.32) * 0.5 + ny * offset)


def _baguette(p: _Pen) -> None:
    p.poly(_rotate(_arc(0, 0, 0.98, 0.3, 0, 360, 32), -40))
    for x in (-0.5, -0.1, 0.3, 0.7):
        p.poly(_rotate([(x - 0.16, 0.1), (x - 0.02, -0.16), (x + 0.06, -0.12), (x - 0.08, 0.14)], -40), DARK)


def _eiffel(p: _Pen) -> None:
    def half(y: float) -> float:  # half-width: a concave taper, narrow for most of the height
        return 0.04 + 0.6 * ((y + 0.98) / 1.74) ** 2.2

    ys = [-0.98 + 1.74 * i / 12 for i in range(13)]
    p.poly([(half(y), y) for y in ys] + [(-half(y), y) for y in reversed(ys)])
    p.poly(_arc(0, 0.76, 0.3, 0.34, 180, 360, 12) + [(0.3, 0.78), (-0.3, 0.78)], ERASE)  # arch
    p.rect(-0.5, 0.08, 0.5, 0.2)                       # first platform
    p.rect(-0.3, -0.36, 0.3, -0.28)                    # second platform
    p.rect(-0.36, 0.2, 0.36, 0.26, DARK)
    p.rect(-0.06, -0.98, 0.06, -0.7)                   # antenna


def _pretzel(p: _Pen) -> None:
    # A heart-shaped knot with three holes: two upper loops and a small lower eye.
    for side in (-1, 1):
        p.circle(side * 0.44, -0.16, 0.52)
    p.poly([(-0.92, 0.0), (0.92, 0.0), (0.28, 0.8), (-0.28, 0.8)])
    p.circle(0, 0.62, 0.32)
    p.poly([(-0.16, -0.72), (0.16, -0.72), (0.0, -0.44)], ERASE)   # the notch at the top
    for side in (-1, 1):
        p.circle(side * 0.44, -0.14, 0.24, ERASE)
    p.poly([(-0.2, 0.5), (0.2, 0.5), (0.0, 0.2)], ERASE)
    p.line((-0.34, 0.62), (0.2, -0.34), 0.12, DARK)                 # the twist
    p.line((0.34, 0.62), (-0.2, -0.34), 0.12, DARK)


def _beer_mug(p: _Pen) -> None:
    p.rect(-0.62, -0.46, 0.34, 0.76)                   # glass
    p.rect(0.28, -0.3, 0.78, -0.14)                    # handle
    p.rect(0.62, -0.3, 0.78, 0.5)
    p.rect(0.28, 0.36, 0.78, 0.5)
    for x in (-0.36, -0.14, 0.08):
        p.rect(x - 0.04, -0.24, x + 0.04, 0.6, DARK)  # facets
    for x in (-0.46, -0.16, 0.14):
        p.circle(x, -0.58, 0.2, LIGHT)                 # foam
    p.rect(-0.64, -0.6, 0.38, -0.42, LIGHT)


def _kite(p: _Pen) -> None:
    # A diamond kite, taller than wide and pointed at the top, with its spars and a tail of bows.
    p.poly([(0.0, -0.97), (0.58, -0.3), (0.0, 0.5), (-0.58, -0.3)])
    p.line((0.0, -0.97), (0.0, 0.5), 0.09, DARK)                  # spine
    p.line((-0.58, -0.3), (0.58, -0.3), 0.09, DARK)               # cross spar
    tail = [(0.0, 0.5), (0.18, 0.64), (0.02, 0.8), (0.2, 0.95)]
    for a, b in itertools.pairwise(tail):
        p.line(a, b, 0.08)
    for x, y in ((0.18, 0.64), (0.02, 0.8)):                     # bows on the tail
        p.poly([(x - 0.16, y - 0.09), (x + 0.16, y + 0.09), (x + 0.16, y - 0.09), (x - 0.16, y + 0.09)], LIGHT)


_DRAW: dict[str, Callable[[_Pen], None]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "star": _star5, "cross": _cross,
    "lantern": _lantern, "pagoda": _pagoda, "torii": _torii, "daruma": _daruma,
    "taegeuk": _taegeuk, "gat": _gat, "matryoshka": _matryoshka, "onion_dome": _onion_dome,
    "crescent": _crescent_obj, "khamsa": _khamsa, "fan": _fan, "guitar": _guitar,
    "diya": _diya, "kalash": _kalash, "baguette": _baguette, "eiffel": _eiffel,
    "pretzel": _pretzel, "beer_mug": _beer_mug, "kite": _kite,
}
assert set(_DRAW) == set(DRAWABLE), "every world object needs a drawing"
assert set(SHAPES) | set(CONCEPTS) | set(UNNAMED_OBJECTS) == set(DRAWABLE)

#: Style geometry, in output pixels (a fraction of the image side would blur the patterns at 32 px).
OUTLINE_WIDTH: float = 1.0   # outline: width of the ring drawn just outside the silhouette
STRIPE_PERIOD: int = 4      # striped: 2 rows kept, 2 cut, repeating
DOT_PERIOD: int = 3         # dotted: one dot per 3 x 3 pixel cell ...
DOT_RADIUS: float = 0.8     # ... of this radius, centred in the cell

#: Kinds of hint map :func:`render_hint` draws.
HINT_KINDS: tuple[str, ...] = ("silhouette", "box")


def object_geometry(obj: SceneObject, size: int) -> tuple[float, float, float]:
    """Centre (x, y) and radius in output pixels of ``obj``'s bounding circle."""
    px, py = POSITIONS[obj.position]
    return (px + obj.dx) * size, (py + obj.dy) * size, SIZE_FRACTION[obj.size] * obj.scale * size / 2


def _check_scene(scene: Scene, size: int) -> None:
    if size < 8:
        raise PolyBridgeValueError(f"size={size} is too small to draw objects; use 8 or more")
    if scene.background not in BACKGROUNDS:
        raise PolyBridgeValueError(f"background={scene.background!r} is not valid; use one of {list(BACKGROUNDS)}")
    for obj in scene.objects:
        if obj.shape not in _DRAW:
            raise PolyBridgeValueError(f"shape={obj.shape!r} is not drawable; use one of {list(DRAWABLE)}")
        if obj.colour not in COLOURS:
            raise PolyBridgeValueError(f"colour={obj.colour!r} is not valid; use one of {list(COLOURS)}")
        if obj.style not in STYLES:
            raise PolyBridgeValueError(f"style={obj.style!r} is not valid; use one of {list(STYLES)}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int, slot: int) -> None:
    cx, cy, r = object_geometry(obj, size)
    _DRAW[obj.shape](_Pen(draw, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, slot))


def _style_keep(ink: np.ndarray, obj: SceneObject, size: int, slot: int) -> np.ndarray:
    """Restyles one object's palette indices ``ink`` (0 outside it) in place; returns where it is drawn."""
    inside = ink != 0
    big = ink.shape[0]
    if obj.style == "outline":
        # A ring just outside the silhouette, the inside cleared: unlike a band inside the edge, it also
        # shows on parts thinner than the band (a small crescent, the bars of a torii).
        reach = max(1, round(OUTLINE_WIDTH * SUPERSAMPLE))
        mask = Image.fromarray(inside.astype(np.uint8) * 255)
        grown = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * reach + 1))) > 0
        cx, cy, r = (v * SUPERSAMPLE for v in object_geometry(obj, size))
        centres = np.arange(big) + 0.5
        circle = (centres[None, :] - cx) ** 2 + (centres[:, None] - cy) ** 2 <= r**2  # stay in the bounding circle
        keep = grown & ~inside & circle
        ink[keep] = slot  # the ring is in the object colour
        return keep
    rows = np.arange(big) // SUPERSAMPLE  # output pixel of each supersampled row
    if obj.style == "striped":
        return inside & ((rows % STRIPE_PERIOD) < STRIPE_PERIOD // 2)[:, None]
    if obj.style == "dotted":
        centre = (np.arange(big) + 0.5) / SUPERSAMPLE % DOT_PERIOD - DOT_PERIOD / 2  # offset from the cell's centre
        return inside & (centre[:, None] ** 2 + centre[None, :] ** 2 <= DOT_RADIUS**2)
    raise AssertionError(obj.style)  # _check_scene refuses unknown styles


def _draw_styled(canvas: Image.Image, obj: SceneObject, size: int, slot: int) -> None:
    """Draws ``obj`` on its own layer, restyles it, then pastes it (objects never overlap, see the module doc)."""
    layer = Image.new("P", canvas.size, 0)
    _draw_object(ImageDraw.Draw(layer), obj, size, slot)
    ink = np.array(layer)
    keep = _style_keep(ink, obj, size, slot)
    canvas.paste(Image.fromarray(ink, "P"), (0, 0), Image.fromarray(keep.astype(np.uint8) * 255))


def render_scene(scene: Scene, size: int = 32) -> Image.Image:
    """An RGB ``size`` x ``size`` image of ``scene``."""
    _check_scene(scene, size)
    big = size * SUPERSAMPLE
    canvas = Image.new("P", (big, big), 0)
    palette = list(BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for k, obj in enumerate(scene.objects):
        rgb = COLOURS[obj.colour]
        palette += [*rgb, *dark_shade(rgb), *light_tint(rgb)]
        if obj.style == DEFAULT_STYLE:
            _draw_object(draw, obj, size, 1 + 3 * k)
        else:
            _draw_styled(canvas, obj, size, 1 + 3 * k)
    canvas.putpalette(palette + [0, 0, 0] * (256 - len(palette) // 3))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.BOX)


def render_hint(scene: Scene, size: int = 32, kind: str = "silhouette") -> Image.Image:
    """A ControlNet hint map of ``scene``: an RGB ``size`` x ``size`` image, white objects on black.

    ``silhouette``: each object's drawn area (holes stay black), as :func:`render_scene` would draw it in
    the ``solid`` style; ``box``: the filled square around each object's bounding circle (a layout map).
    Colours, styles and the background are not shown: a hint says where objects are and what outline
    they have, the prompt says the rest. Antialiased like the image, so the two line up pixel for pixel.
    """
    if kind not in HINT_KINDS:
        raise PolyBridgeValueError(f"kind={kind!r} is not a hint map; use one of {list(HINT_KINDS)}")
    _check_scene(scene, size)
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        if kind == "silhouette":
            _draw_object(draw, obj, size, 1)  # inks 1-3; ERASE (0) punches the holes back to black
        else:
            cx, cy, r = (v * SUPERSAMPLE for v in object_geometry(obj, size))
            draw.rectangle((cx - r - 1, cy - r - 1, cx + r, cy + r), fill=1)  # a supersampled pixel of margin
    canvas = canvas.point(lambda v: 255 if v else 0)
    return canvas.resize((size, size), Image.Resampling.BOX).convert("RGB")
