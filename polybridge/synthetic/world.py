"""The vocabulary of the synthetic world: what a scene can contain.

This module is pure data plus the scene dataclasses. The renderer draws these ids,
the grammars (``languages/<code>/grammar.yaml``) name them, the scorer reads them back.
Which language owns which culture-specific concept is registry data
(``synthetic.concepts`` in each ``language.yaml``); here we only list what can be drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: Generic shapes: every language has a word for each of them, English included.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Culture-specific concepts: distinctive multi-part objects. Each is named only in the
#: captions of the language that owns it; every other language calls it an "object".
CONCEPTS: tuple[str, ...] = (
    "lantern", "pagoda",          # zh
    "torii", "daruma",            # ja
    "taegeuk", "gat",             # ko
    "matryoshka", "onion_dome",   # ru
    "crescent", "khamsa",         # ar
    "fan", "guitar",              # es
    "diya", "kalash",             # hi
    "baguette", "eiffel",         # fr
    "pretzel", "beer_mug",        # de
)

#: Every object the captions can describe, in the scorer's class order.
OBJECTS: tuple[str, ...] = SHAPES + CONCEPTS

#: Objects that no language's captions name (every grammar calls them "object", as it does another
#: language's concept), for plugins that teach a new word, such as a Textual Inversion embedding.
#: Kept out of :data:`OBJECTS`, so the default sampler and the committed scene scorer never see them;
#: sample them by asking for them (``sample_scenes(..., objects=UNNAMED_OBJECTS)``).
UNNAMED_OBJECTS: tuple[str, ...] = ("kite",)

#: Every id the renderer can draw.
DRAWABLE: tuple[str, ...] = OBJECTS + UNNAMED_OBJECTS

#: How an object is drawn. ``solid`` is how every default scene is drawn; the others exist for plugins (a
#: style LoRA, say) and are only sampled when asked for (``sample_scenes(..., styles=STYLES)``). See ``render.py``.
STYLES: tuple[str, ...] = ("solid", "outline", "striped", "dotted")
DEFAULT_STYLE: str = "solid"

#: Object colours (sRGB). Well separated in hue and brightness so that a tiny model can learn them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "purple": (160, 60, 200),
}

#: Background colours: darker than every object colour, so objects always stand out.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "gray": (96, 96, 96),
    "brown": (95, 60, 30),
    "navy": (18, 28, 90),
}

SIZES: tuple[str, ...] = ("small", "large")

#: Positions: object centre as fractions of (width, height).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}

#: Two-object scenes use one of these position pairs (they never overlap).
POSITION_PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

#: Object diameter as a fraction of the image side, per size.
SIZE_FRACTION: dict[str, float] = {"small": 0.28, "large": 0.42}


@dataclass(frozen=True)
class SceneObject:
    """One object. ``shape`` is any id of :data:`DRAWABLE` (a generic shape, a concept or an unnamed object).

    ``dx``, ``dy`` (fractions of the image side) and ``scale`` are the small jitter
    drawn when the scene was sampled, so that rendering is a pure function of the scene.
    ``style`` is one of :data:`STYLES`; it is last, so positional construction is unchanged.
    """

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    style: str = DEFAULT_STYLE

    @property
    def is_concept(self) -> bool:
        return self.shape in CONCEPTS

    @property
    def is_unnamed(self) -> bool:
        return self.shape in UNNAMED_OBJECTS

    def to_dict(self) -> dict:
        """Its fields; ``style`` only when it is not the default, so default scenes serialise as they always did."""
        data = asdict(self)
        if data["style"] == DEFAULT_STYLE:
            del data["style"]
        return data


@dataclass(frozen=True)
class Scene:
    """A scene: a background and one or two objects (two objects sit at a :data:`POSITION_PAIRS` pair)."""

    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(
            background=data["background"],
            objects=tuple(SceneObject(**o) for o in data["objects"]),
        )
