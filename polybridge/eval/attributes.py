"""Ground-truth attribute accuracy of generated images: prompt from a scene, image scored against it.

A prompt says only what its language names: an English prompt calls a lantern "an object", so the
shape of a concept object is not asked for in English and is not scored there (``shape`` then
covers generic shapes only). :func:`prompt_accuracy` picks the attributes a language's prompts name.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from polybridge.synthetic.scenes import sample_scenes, scene_rng
from polybridge.synthetic.world import Scene

#: Attributes every prompt names, whatever its language.
ALWAYS_NAMED = ("background", "colour", "size", "position")


def prompt_accuracy(result: dict, names_concepts: bool) -> dict[str, float]:
    """The scorer's result reduced to what the prompts asked for, plus their mean (``mean``).

    ``names_concepts``: whether the prompts name culture-specific concepts (a native language
    over its own concepts); if not, ``shape`` is the generic-shape accuracy only.
    """
    out = {k: result[k] for k in ALWAYS_NAMED}
    out["shape"] = result["shape"] if names_concepts else result["shape_generic"]
    values = [v for v in out.values() if not math.isnan(v)]
    out["mean"] = sum(values) / len(values)
    return out


def eval_prompts(caption: Callable[[Scene, random.Random], str], n: int, seed: int = 0,
                 split: str = "test") -> tuple[list[Scene], list[str]]:
    """``n`` seeded scenes of ``split`` and their captions (one caption rng per scene)."""
    scenes = sample_scenes(n, seed, split)
    captions = [caption(s, scene_rng(seed, split, i, "eval-caption")) for i, s in enumerate(scenes)]
    return scenes, captions


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], *, guidance_scale: float, num_inference_steps: int = 25, seed: int = 0,
             batch_size: int = 50, size: int | None = None, **kwargs) -> list:
    """Images for ``prompts`` with a per-batch seeded generator (same seed, same images)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        gen = torch.Generator().manual_seed(seed + start)
        chunk = list(prompts[start:start + batch_size])
        out = pipe(chunk, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=gen,
                   height=size, width=size, **kwargs)
        images.extend(out.images)
    return images


def guidance_sweep(pipe, scorer, scenes: Sequence[Scene], prompts: Sequence[str], guidances: Sequence[float],
                   names_concepts: bool, **generate_kwargs) -> dict[float, dict]:
    """Prompt accuracy at each guidance scale (same prompts, seeds and steps)."""
    results = {}
    for g in guidances:
        images = generate(pipe, prompts, guidance_scale=g, **generate_kwargs)
        full = scorer.score(images, list(scenes))
        results[g] = {"accuracy": prompt_accuracy(full, names_concepts), "scorer": full, "images": images}
    return results
