"""Synthetic-world datasets: rendered images, captions and the ground truth behind them.

Two outputs, one source of truth. :func:`build_dataset` returns an in-memory Hugging Face
``datasets.Dataset`` (what the trainers consume); :func:`render_to_dir` writes PNGs plus a
``scenes.jsonl`` (what people look at, and what :meth:`SceneScorer.score_dir` reads back).

Captions come from a ``captioner(scene, lang, rng) -> str`` callable (the registry's grammars in
practice, see ``captions.py``); each caption gets its own rng seeded by ``(seed, split, index,
lang)``, so adding a language or reordering them never changes another language's captions.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polybridge.atomic import atomic_dir
from polybridge.errors import PolyBridgeValueError
from polybridge.synthetic.render import render_scene
from polybridge.synthetic.scenes import is_heldout, sample_scenes, scene_rng
from polybridge.synthetic.world import Scene

Captioner = Callable[[Scene, str, random.Random], str]

#: Version of the on-disk layout written by :func:`render_to_dir` (recorded in ``meta.json``).
DIR_FORMAT = "polybridge-synthetic-dir/1"


def scene_record(scene: Scene) -> dict[str, Any]:
    """Flat ground-truth columns for one scene (no jitter: that is rendering detail, kept in ``scene``)."""
    return {
        "background": scene.background,
        "n_objects": len(scene.objects),
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position, "is_concept": o.is_concept}
            for o in scene.objects
        ],
        "heldout": is_heldout(scene),
    }


def plain_caption(scene: Scene, lang: str = "plain", rng: random.Random | None = None) -> str:
    """A fixed-order description naming every object by its id; ground truth for tests and debugging, not a language."""
    parts = [f"a {o.size} {o.colour} {o.shape.replace('_', ' ')} at the {o.position}" for o in scene.objects]
    return " and ".join(parts) + f" on a {scene.background} background"


def caption_rng(seed: int, split: str, index: int, lang: str) -> random.Random:
    return scene_rng(seed, split, index, f"caption-{lang}")


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise PolyBridgeValueError(f"n={n!r} is not valid; it must be a positive integer (the number of scenes)")
    return n


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise PolyBridgeValueError(f"size={size!r} is not valid; it must be an integer >= 8 (the image side in pixels)")
    return size


def build_dataset(
    n: int,
    seed: int,
    split: str = "train",
    size: int = 32,
    languages: Sequence[str] | None = None,
    captioner: Captioner | None = None,
    concepts: Sequence[str] | None = None,
):
    """A ``datasets.Dataset`` with ``image``, one ``caption_<code>`` per language, and the ground truth.

    Columns: ``image`` (datasets.Image), ``caption_<code>``..., ``background``, ``n_objects``,
    ``objects`` (list of {shape, colour, size, position, is_concept}), ``heldout``, ``scene``
    (the exact scene as JSON, jitter included, so an image can be re-rendered) and ``index``.
    ``concepts`` restricts the drawable concepts, as in :func:`sample_scenes`.
    """
    import datasets

    _check_n(n)
    _check_size(size)
    languages = list(languages or [])
    if languages and captioner is None:
        raise PolyBridgeValueError(f"languages={languages} need a captioner(scene, lang, rng); pass captioner=")
    if len(set(languages)) != len(languages):
        raise PolyBridgeValueError(f"languages={languages} lists a language twice")
    scenes = sample_scenes(n, seed, split, concepts=concepts)
    columns: dict[str, list] = {"index": list(range(n)), "image": [render_scene(s, size) for s in scenes]}
    for lang in languages:
        columns[f"caption_{lang}"] = [captioner(s, lang, caption_rng(seed, split, i, lang)) for i, s in enumerate(scenes)]
    records = [scene_record(s) for s in scenes]
    for key in ("background", "n_objects", "objects", "heldout"):
        columns[key] = [r[key] for r in records]
    columns["scene"] = [json.dumps(s.to_dict(), sort_keys=True) for s in scenes]
    features = datasets.Features({
        "index": datasets.Value("int32"),
        "image": datasets.Image(),
        **{f"caption_{lang}": datasets.Value("string") for lang in languages},
        "background": datasets.Value("string"),
        "n_objects": datasets.Value("int8"),
        "objects": datasets.List({
            "shape": datasets.Value("string"), "colour": datasets.Value("string"), "size": datasets.Value("string"),
            "position": datasets.Value("string"), "is_concept": datasets.Value("bool"),
        }),
        "heldout": datasets.Value("bool"),
        "scene": datasets.Value("string"),
    })
    info = datasets.DatasetInfo(
        description=f"polybridge synthetic world: split={split} seed={seed} n={n} size={size}", features=features
    )
    return datasets.Dataset.from_dict(columns, features=features, info=info)


def render_to_dir(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    split: str = "train",
    size: int = 32,
    lang: str | None = None,
    captioner: Captioner | None = None,
    overwrite: bool = False,
    concepts: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    """Writes ``000000.png``... plus ``scenes.jsonl`` and ``meta.json`` to ``out_dir``, atomically.

    Everything is written into a temporary sibling folder that is renamed into place at the end,
    so a crash or Ctrl-C leaves either the old folder or the complete new one, never a half.
    ``lang`` with a ``captioner`` fills each record's ``caption``; without them it is null.
    """
    _check_n(n)
    _check_size(size)
    if lang is not None and captioner is None:
        raise PolyBridgeValueError(f"lang={lang!r} needs a captioner(scene, lang, rng); pass captioner=")
    if captioner is not None and lang is None:
        raise PolyBridgeValueError("captioner= was given without lang=; say which language the captions are in")
    out = Path(out_dir).expanduser().absolute()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        scenes = sample_scenes(n, seed, split, concepts=concepts)
        lines = []
        iterator: Any = enumerate(scenes)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=n, desc=f"render {out.name}")
        for i, scene in iterator:
            file = f"{i:06d}.png"
            render_scene(scene, size).save(tmp / file, format="PNG")
            caption = captioner(scene, lang, caption_rng(seed, split, i, lang)) if captioner and lang else None
            lines.append(json.dumps(
                {"file": file, "index": i, "scene": scene.to_dict(), "caption": caption, "lang": lang, **scene_record(scene)},
                ensure_ascii=False,
            ))
        (tmp / "scenes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        meta = {"format": DIR_FORMAT, "n": n, "seed": seed, "split": split, "size": size, "lang": lang,
                "concepts": list(concepts) if concepts is not None else None}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out

