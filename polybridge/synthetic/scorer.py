"""The ground-truth scorer: a small CNN that reads every object's attributes back from an image.

It is how every benchmark knows whether a generated image shows what its prompt asked for:
the prompt came from a :class:`~polybridge.synthetic.world.Scene`, so the scene is the truth.
The network answers, for the background and for each of the five :data:`POSITIONS`, which object
(or nothing) is there, in which colour and size. Each position reads its own window of the last
feature map through one shared layer (an object looks the same wherever it sits), then its own
small output layer (a window also sees the edges of its neighbours, which differ per position).

Shape and size are read from a colour-blind view of the image (:func:`colour_blind`) and colour
from a small separate branch: trained on the held-out-free split, a network that sees hue when
it decides shape learns that, say, blue triangles do not exist, and misreads them at test time.

Weights are safetensors with a ``config.json`` that records the image size and every class list,
so weights trained against another version of the world refuse to load instead of scoring garbage.
Build the default weights with ``python scripts/build_scorer.py``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from polybridge.atomic import atomic_dir
from polybridge.errors import PolyBridgeError, PolyBridgeValueError
from polybridge.synthetic.world import BACKGROUNDS, COLOURS, CONCEPTS, OBJECTS, POSITIONS, SHAPES, SIZES, Scene

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "polybridge-scene-scorer"
EMPTY = "empty"

#: Where the committed default weights live.
DEFAULT_SCORER_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "scorer"

# The class lists a scorer is trained against; saved in its config and checked on load.
_WORLD_CLASSES: dict[str, list[str]] = {
    "backgrounds": list(BACKGROUNDS),
    "objects": list(OBJECTS),
    "colours": list(COLOURS),
    "sizes": list(SIZES),
    "positions": list(POSITIONS),
}


def colour_blind(x: torch.Tensor) -> torch.Tensor:
    """Two channels of ``x`` [B, 3, H, W] that show shape but say nothing about an object's colour.

    1. Max over RGB: every object colour is brighter than every background, and the six colours
       have nearly the same max (180-240), so it shows silhouettes without naming a hue.
    2. Distance to the background colour (the median of the corner pixels, which objects never
       reach) divided by its local maximum: accents show as fractions of the object's strongest
       part. Dividing matters: raw distance (or min over RGB) tells white from the other colours,
       and a shape reader that can tell white from red learns from the held-out-free training split
       that white guitars do not exist, then misreads them in the test split.
    """
    b, _, h, _ = x.shape
    corners = torch.cat([x[:, :, :2, :2], x[:, :, :2, -2:], x[:, :, -2:, :2], x[:, :, -2:, -2:]], dim=-1)
    bg = corners.reshape(b, 3, -1).median(dim=-1).values[:, :, None, None]
    dist = (x - bg).norm(dim=1, keepdim=True) / math.sqrt(3)
    k = 2 * (h // 6) + 1  # about an object's radius
    # The floor keeps background noise (generated images) from being blown up to full contrast.
    local = nn.functional.max_pool2d(dist, k, stride=1, padding=k // 2).clamp_min(0.2)
    return torch.cat([x.amax(1, keepdim=True), (dist / local).clamp(max=1.0)], dim=1)


class ScorerError(PolyBridgeError, RuntimeError):
    """Scorer weights or inputs are missing or do not match the world."""


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SceneScorer(nn.Module):
    """Background head plus, per position, object-or-empty / colour / size heads.

    A subclass may read another world (``WORLD_CLASSES``: more objects) and more per-object attributes
    (``OBJECT_ATTRIBUTES``: one more head per position on the shape trunk each); see ``plugin_scorer.py``.
    """

    FORMAT: str = FORMAT
    VERSION: int = 3
    WORLD_CLASSES: dict[str, list[str]] = _WORLD_CLASSES
    OBJECT_ATTRIBUTES: dict[str, tuple[str, ...]] = {}
    BUILD: str = "scripts/build_scorer.py"

    def __init__(
        self,
        image_size: int = 32,
        widths: Sequence[int] = (32, 48, 64, 96),
        hidden: int = 160,
        colour_widths: Sequence[int] = (16, 24, 32),
        colour_hidden: int = 48,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise PolyBridgeValueError(f"image_size={image_size} must be a multiple of 4 (the trunks halve it twice)")
        self.config: dict[str, Any] = {
            "format": self.FORMAT,
            "version": self.VERSION,
            "image_size": image_size,
            "widths": list(widths),
            "hidden": hidden,
            "colour_widths": list(colour_widths),
            "colour_hidden": colour_hidden,
            **self.WORLD_CLASSES,
        }
        w1, w2, w3, w4 = widths
        # Shape trunk: sees the colour-blind view only (see colour_blind), so it cannot learn
        # "blue things are never triangles" from the training split and fail on held-out pairs.
        self.trunk = nn.Sequential(
            _block(2, w1), _block(w1, w1), nn.MaxPool2d(2),
            _block(w1, w2), _block(w2, w3), nn.MaxPool2d(2),
            _block(w3, w4), _block(w4, w4),
        )
        c1, c2, c3 = colour_widths
        self.colour_trunk = nn.Sequential(
            _block(3, c1), nn.MaxPool2d(2), _block(c1, c2), nn.MaxPool2d(2), _block(c2, c3),
        )
        fmap = image_size // 4
        # Each position reads half the map (16 px at 32 px): a large object plus its jitter fits inside.
        self.window = fmap // 2
        # Top-left cell of each position's window, from the position's centre in the feature map.
        self.starts: list[tuple[int, int]] = []
        for px, py in POSITIONS.values():
            sx = min(max(round(px * fmap - self.window / 2), 0), fmap - self.window)
            sy = min(max(round(py * fmap - self.window / 2), 0), fmap - self.window)
            self.starts.append((sy, sx))
        self.squeeze = nn.Sequential(nn.Conv2d(w4, w4 // 2, 1), nn.ReLU(inplace=True))
        self.shared = nn.Sequential(nn.Linear(w4 // 2 * self.window**2, hidden), nn.ReLU(inplace=True))
        self.colour_shared = nn.Sequential(nn.Linear(c3 * self.window**2, colour_hidden), nn.ReLU(inplace=True))
        self.n_obj, self.n_col, self.n_size = len(self.WORLD_CLASSES["objects"]) + 1, len(COLOURS), len(SIZES)
        self.n_extra = {name: len(values) for name, values in self.OBJECT_ATTRIBUTES.items()}
        n_out = self.n_obj + self.n_size + sum(self.n_extra.values())
        self.heads = nn.ModuleList(nn.Linear(hidden, n_out) for _ in POSITIONS)
        self.colour_heads = nn.ModuleList(nn.Linear(colour_hidden + hidden, self.n_col) for _ in POSITIONS)
        self.background = nn.Linear(c3, len(BACKGROUNDS))

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def _windows(self, g: torch.Tensor) -> torch.Tensor:
        w = self.window
        return torch.stack([g[:, :, sy:sy + w, sx:sx + w].flatten(1) for sy, sx in self.starts], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: float [B, 3, S, S] in [0, 1]. Returns logits: background [B, 4]; objects, colour, size [B, 5, C]
        (and each of ``OBJECT_ATTRIBUTES`` [B, 5, C])."""
        h = self.shared(self._windows(self.squeeze(self.trunk(colour_blind(x) - 0.5))))  # [B, P, hidden]
        c = self.colour_trunk(x - 0.5)
        hc = torch.cat([self.colour_shared(self._windows(c)), h], dim=-1)
        out = torch.stack([head(h[:, i]) for i, head in enumerate(self.heads)], dim=1)
        colour = torch.stack([head(hc[:, i]) for i, head in enumerate(self.colour_heads)], dim=1)
        logits = {
            "background": self.background(c.mean(dim=(2, 3))),
            "objects": out[..., : self.n_obj],
            "colour": colour,
            "size": out[..., self.n_obj:self.n_obj + self.n_size],
        }
        start = self.n_obj + self.n_size
        for name, n in self.n_extra.items():
            logits[name], start = out[..., start:start + n], start + n
        return logits

    # ------------------------------------------------------------------ io

    def save_pretrained(self, directory: str | os.PathLike, metrics: dict | None = None) -> None:
        """Writes config.json, fp16 model.safetensors (and metrics.json) atomically: temp folder, then rename."""
        from safetensors.torch import save_file

        with atomic_dir(directory, overwrite=True) as tmp:
            state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous().cpu()
                     for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": self.FORMAT})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
            if metrics is not None:
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SceneScorer":
        from polybridge.weights import read_safetensors

        directory = Path(directory)
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise ScorerError(f"{f}: missing; build scorer weights with `python {cls.BUILD} --out {directory}`")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ScorerError(f"{config_file}: not valid JSON ({e})") from e
        if config.get("format") != cls.FORMAT:
            raise ScorerError(f"{config_file}: key 'format' is {config.get('format')!r}, expected {cls.FORMAT!r}")
        for key, expected in cls.WORLD_CLASSES.items():
            if config.get(key) != expected:
                raise ScorerError(
                    f"{config_file}: key {key!r} is {config.get(key)!r} but the world (polybridge/synthetic/world.py) "
                    f"has {expected}; these weights were trained for another world, rebuild them with "
                    f"`python {cls.BUILD}`"
                )
        arch = ("image_size", "widths", "hidden", "colour_widths", "colour_hidden")
        absent = [k for k in arch if k not in config]
        if absent:
            raise ScorerError(f"{config_file}: missing keys {absent} (written by an older scorer; rebuild it)")
        try:
            model = cls(*(config[k] for k in arch))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ScorerError(f"{config_file}: keys {', '.join(arch)} do not describe a scorer ({e})") from None
        state = read_safetensors(weights_file, "scorer weights")
        expected_keys = set(model.state_dict())
        if set(state) != expected_keys:
            missing, extra = sorted(expected_keys - set(state)), sorted(set(state) - expected_keys)
            raise ScorerError(
                f"{weights_file}: tensors do not match {config_file} (missing {missing[:5]}, unexpected {extra[:5]})"
            )
        try:
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as e:
            raise ScorerError(f"{weights_file}: tensor shapes do not match {config_file} ({e})") from e
        return model.eval()

    # ------------------------------------------------------------------ inference

    def to_tensor(self, images: Any) -> torch.Tensor:
        """PIL images, a uint8 array [B, H, W, 3] or a float tensor [B, 3, H, W] in [0, 1] → model input.

        Images of another size are resized (with a warning), so generated images at any resolution can be scored.
        """
        s = self.image_size
        if isinstance(images, torch.Tensor):
            x = images.detach().float().cpu()
            if x.ndim != 4 or x.shape[1] != 3:
                raise ScorerError(f"image tensor must be [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
            if x.shape[-2:] != (s, s):
                warnings.warn(f"scorer: resizing images from {tuple(x.shape[-2:])} to {s}x{s}", stacklevel=2)
                x = torch.nn.functional.interpolate(x, size=(s, s), mode="area" if x.shape[-1] > s else "bilinear")
            return x
        if isinstance(images, np.ndarray):
            images = [Image.fromarray(a) for a in images]
        arrays = []
        warned = False
        for im in images:
            im = im.convert("RGB")
            if im.size != (s, s):
                if not warned:
                    warnings.warn(f"scorer: resizing images from {im.size[0]}x{im.size[1]} to {s}x{s}", stacklevel=2)
                    warned = True
                im = im.resize((s, s), Image.Resampling.BOX if im.width > s else Image.Resampling.BILINEAR)
            arrays.append(np.asarray(im, dtype=np.uint8))
        if not arrays:
            return torch.zeros(0, 3, s, s)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    @torch.no_grad()
    def _logits(self, images: Any, batch_size: int = 256) -> dict[str, torch.Tensor]:
        x = self.to_tensor(images)
        was_training = self.training
        self.eval()
        parts = [self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)] or [self(x[:0])]
        self.train(was_training)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def predict(self, images: Any) -> list[dict]:
        """Scene-like dicts: ``{"background", "objects": [{"shape", "colour", "size", "position"}, ...]}``
        (each object also gives each of ``OBJECT_ATTRIBUTES``)."""
        out = self._logits(images)
        bg = out["background"].argmax(-1).tolist()
        obj, col, siz = (out[k].argmax(-1).tolist() for k in ("objects", "colour", "size"))
        extra = {name: (values, out[name].argmax(-1).tolist()) for name, values in self.OBJECT_ATTRIBUTES.items()}
        names, colours, sizes, positions = self.WORLD_CLASSES["objects"], list(COLOURS), list(SIZES), list(POSITIONS)
        backgrounds = list(BACKGROUNDS)
        result = []
        for b in range(len(bg)):
            objects = [
                {"shape": names[obj[b][p]], "colour": colours[col[b][p]], "size": sizes[siz[b][p]], "position": positions[p],
                 **{name: values[read[b][p]] for name, (values, read) in extra.items()}}
                for p in range(len(positions)) if obj[b][p] < len(names)
            ]
            result.append({"background": backgrounds[bg[b]], "objects": objects})
        return result

    def score(self, images: Any, scenes: Sequence[Scene | dict]) -> dict:
        """Per-attribute accuracy of the predictions against ``scenes`` (see :func:`score_predictions`)."""
        if len(scenes) != _len(images):
            raise ScorerError(f"got {_len(images)} images but {len(scenes)} scenes")
        return self.score_predictions(self.predict(images), scenes)

    def score_predictions(self, predictions: Sequence[dict], scenes: Sequence[Scene | dict]) -> dict:
        """The accuracies :meth:`score` reports for these predictions (:func:`score_predictions`)."""
        return score_predictions(predictions, scenes)

    def score_dir(self, directory: str | os.PathLike) -> dict:
        """Scores a folder written by :func:`polybridge.synthetic.dataset.render_to_dir` (or any folder laid out like it)."""
        images, scenes = load_scored_dir(directory)
        return self.score(images, scenes)


def _len(images: Any) -> int:
    return len(images) if not isinstance(images, torch.Tensor) else images.shape[0]


def load_scored_dir(directory: str | os.PathLike) -> tuple[list[Image.Image], list[Scene]]:
    """The images and scenes listed by ``directory/scenes.jsonl``; every error names the file."""
    directory = Path(directory)
    index = directory / "scenes.jsonl"
    if not index.is_file():
        raise ScorerError(
            f"{index}: missing; a scored folder needs scenes.jsonl (one JSON object per line with 'file' and 'scene')"
        )
    images, scenes = [], []
    for lineno, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            file, scene = rec["file"], Scene.from_dict(rec["scene"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ScorerError(f"{index}:{lineno}: not a record with 'file' and 'scene' ({e!r})") from e
        path = directory / file
        if not path.is_file():
            raise ScorerError(f"{path}: missing (listed in {index} line {lineno})")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except Exception as e:  # PIL raises several types for a truncated or foreign file
            raise ScorerError(f"{path}: not a readable image ({e})") from e
        scenes.append(scene)
    if not scenes:
        raise ScorerError(f"{index}: lists no images")
    return images, scenes


def score_predictions(predictions: Sequence[dict], scenes: Sequence[Scene | dict]) -> dict:
    """Accuracies in [0, 1]; object attributes are read at each true object's position.

    - ``background``: per image.
    - ``shape`` / ``colour`` / ``size``: per true object, the prediction at its position (a missed object is wrong).
    - ``position``: per image, the set of occupied positions is exactly right.
    - ``shape_generic`` / ``shape_concept`` and ``per_concept``: ``shape`` split by kind of object.
    - ``scene``: per image, everything right. ``n_images`` / ``n_objects`` say what the figures rest on.
    """
    hits: dict[str, list[int]] = {k: [] for k in ("background", "shape", "colour", "size", "position",
                                                   "shape_generic", "shape_concept", "scene")}
    per_concept: dict[str, list[int]] = {c: [] for c in CONCEPTS}
    per_shape: dict[str, list[int]] = {s: [] for s in SHAPES}
    n_objects = 0
    for pred, truth in zip(predictions, scenes, strict=True):
        if isinstance(truth, dict):
            truth = Scene.from_dict(truth)
        at = {o["position"]: o for o in pred["objects"]}
        bg_ok = pred["background"] == truth.background
        hits["background"].append(int(bg_ok))
        pos_ok = set(at) == {o.position for o in truth.objects}
        hits["position"].append(int(pos_ok))
        all_ok = bg_ok and pos_ok
        for o in truth.objects:
            n_objects += 1
            p = at.get(o.position, {})
            ok = {k: int(p.get(k) == getattr(o, k)) for k in ("shape", "colour", "size")}
            for k, v in ok.items():
                hits[k].append(v)
            if not o.is_unnamed:  # an unnamed object counts in "shape" only (plugin_scorer breaks it down)
                hits["shape_concept" if o.is_concept else "shape_generic"].append(ok["shape"])
                (per_concept if o.is_concept else per_shape)[o.shape].append(ok["shape"])
            all_ok = all_ok and all(ok.values())
        hits["scene"].append(int(all_ok))

    def mean(v: list[int]) -> float:
        return float(sum(v) / len(v)) if v else math.nan

    result: dict[str, Any] = {k: mean(v) for k, v in hits.items()}
    result["per_concept"] = {k: mean(v) for k, v in per_concept.items()}
    result["per_shape"] = {k: mean(v) for k, v in per_shape.items()}
    result["n_images"] = len(hits["background"])
    result["n_objects"] = n_objects
    return result


def load_default_scorer() -> SceneScorer:
    """The committed scorer; a clear error says how to build it when the weights are absent."""
    if not (DEFAULT_SCORER_DIR / WEIGHTS_NAME).is_file():
        raise ScorerError(
            f"{DEFAULT_SCORER_DIR / WEIGHTS_NAME}: missing; build the default scorer with `python scripts/build_scorer.py`"
        )
    return SceneScorer.from_pretrained(DEFAULT_SCORER_DIR)


def scene_targets(
    scenes: Sequence[Scene],
    objects: Sequence[str] = OBJECTS,
    attributes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """Training targets: background [B]; objects, colour, size [B, 5] (empty → last object class, -100 for attributes).

    ``objects``: the object classes (a scorer's ``WORLD_CLASSES["objects"]``); ``attributes``: more per-object
    attributes and their classes (a scorer's ``OBJECT_ATTRIBUTES``), each one more [B, 5] target.
    """
    attributes = dict(attributes or {})
    positions = {p: i for i, p in enumerate(POSITIONS)}
    object_ids = {o: i for i, o in enumerate(objects)}
    colours, sizes, backgrounds = ({n: i for i, n in enumerate(d)} for d in (COLOURS, SIZES, BACKGROUNDS))
    extra_ids = {name: {v: i for i, v in enumerate(values)} for name, values in attributes.items()}
    b = len(scenes)
    obj = torch.full((b, len(positions)), len(objects), dtype=torch.long)
    col = torch.full((b, len(positions)), -100, dtype=torch.long)
    siz = torch.full((b, len(positions)), -100, dtype=torch.long)
    extra = {name: torch.full((b, len(positions)), -100, dtype=torch.long) for name in attributes}
    bg = torch.tensor([backgrounds[s.background] for s in scenes], dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            p = positions[o.position]
            obj[i, p], col[i, p], siz[i, p] = object_ids[o.shape], colours[o.colour], sizes[o.size]
            for name, ids in extra_ids.items():
                extra[name][i, p] = ids[getattr(o, name)]
    return {"background": bg, "objects": obj, "colour": col, "size": siz, **extra}


def scorer_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over every head; per-object heads ignore empty positions (target -100)."""
    ce = nn.functional.cross_entropy
    loss = ce(logits["background"], targets["background"]) + ce(logits["objects"].flatten(0, 1), targets["objects"].flatten())
    for name in targets:
        if name not in ("background", "objects"):
            loss = loss + ce(logits[name].flatten(0, 1), targets[name].flatten(), ignore_index=-100)
    return loss
