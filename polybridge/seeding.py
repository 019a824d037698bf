"""Seeds that are a pure function of (seed, purpose, step).

Every seeded loop in polybridge (the branch trainer's epoch order and synthetic data, the embedded default's
builders) draws its randomness from :func:`step_seed`, so a run resumed at step ``k`` sees exactly the batches an
uninterrupted run sees from step ``k`` on, whatever happened before the kill.
"""

from __future__ import annotations

import random


def step_seed(seed: int, stage: str, step: int) -> int:
    """A seed per (stage, step): data order survives a resume exactly."""
    return random.Random(f"{stage}:{seed}:{step}").getrandbits(31)
