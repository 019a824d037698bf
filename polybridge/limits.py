"""The documented upper bounds on sizes, steps, counts and scales, checked before any work starts.

A number past one of these is a user's mistake (``--steps 100000``, ``--batch-size 1000000000``,
``branch.scale: 1e308``) that would otherwise run for days, exhaust memory or give NaN images; each is refused
with a :class:`~polybridge.errors.PolyBridgeValueError` naming the argument or key and the valid range. The
bounds are generous for the models polybridge runs (SD 1.x/2.x/XL and the embedded tiny backbone); README
"Limits" lists them.
"""

from __future__ import annotations

import math
from typing import Any

from polybridge.errors import PolyBridgeValueError

#: Denoising steps of one generation call (schedulers are trained on 1000 timesteps).
MAX_INFERENCE_STEPS = 1000
#: Classifier-free guidance scale (useful values are 1..20).
MAX_GUIDANCE = 100.0
#: A branch's scale (``branch.scale``, ``--branch-scale``); 1 is the trained strength.
MAX_BRANCH_SCALE = 10.0
#: Image side in pixels for generation and synthetic rendering.
MAX_IMAGE_SIZE = 4096
#: Image side in pixels of a rendered synthetic scene (``synth render --size``; the world is drawn at 32).
MAX_RENDER_SIZE = 1024
#: Images (prompts x images per prompt) in one generation call or one ``generate`` grid.
MAX_IMAGES = 10_000
#: Enlargement of a ``generate`` grid; the grid is also kept under MAX_GRID_PIXELS.
MAX_UPSCALE = 16
#: Pixels of a written image grid (about 16k x 16k).
MAX_GRID_PIXELS = 1 << 28
#: Global batch of one training or generation step.
MAX_BATCH_SIZE = 4096
#: Training optimizer steps.
MAX_TRAIN_STEPS = 10_000_000
#: Training examples (and rendered scenes).
MAX_NUM_SAMPLES = 10_000_000
#: Learning rate of the branch trainer.
MAX_LEARNING_RATE = 1.0
#: Prompts in one ``--file``.
MAX_PROMPT_LINES = 1_000_000


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` if it is an integer in [low, high], else an error naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PolyBridgeValueError(f"{name} must be a whole number from {low:,} to {high:,}, got {value!r}")
    return value


def check_float(value: Any, name: str, low: float, high: float) -> float:
    """``value`` if it is a finite number in [low, high], else an error naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise PolyBridgeValueError(f"{name} must be a finite number from {low:g} to {high:g}, got {value!r}")
    return float(value)
