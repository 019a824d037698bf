"""The synthetic world: seeded scenes, their renderer, per-language captions and a ground-truth scorer.

No machine that builds or tests polybridge can download data, so every claim is measured here,
on a world whose truth is known. See ``world.py`` for what a scene can contain.
"""
