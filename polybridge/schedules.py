"""The learning-rate schedule every trainer in polybridge uses: linear warmup, then a cosine (or constant).

One function for the branch trainer and the embedded default's builders (VAE, UNet, native encoders), so a change
to the schedule is made once. Its factors are those the four former copies computed, to the last bit (a test
checks it), so the committed weights can still be rebuilt bit for bit.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, *, floor: float = 0.0, cosine: bool = True,
                  angle_from_fraction: bool = False) -> float:
    """The factor ``LambdaLR`` multiplies the peak learning rate by at ``step`` (0-based).

    - warmup: ``(step + 1) / warmup`` up to 1 (none when ``warmup`` is 0 or less);
    - then, with ``cosine``, a half cosine from 1 at step 0 to ``floor`` at ``total`` (held there after), so
      ``floor`` keeps a small learning rate at the end; without it, constant.

    ``angle_from_fraction``: the cosine's angle as ``pi * (step / total)`` (how the branch trainer computes it)
    instead of ``pi * step / total`` (the embedded builders). The two round differently in the last bit for about
    a third of the steps; each caller keeps its own so that what it trains does not change by one bit.
    """
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if not cosine:
        return warm
    done = min(step, total)
    angle = math.pi * (done / total) if angle_from_fraction else math.pi * done / total
    return warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(angle)))
