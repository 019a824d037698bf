"""Scenes and images as the float tensors models read: ``(B, 3, H, W)`` in ``[-1, 1]``.

The branch trainer's synthetic data and the embedded default's builders (VAE, UNet, native encoders) all feed
images this way, so it is stated once, here, beside the renderer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from polybridge.synthetic.render import render_scene
from polybridge.synthetic.world import Scene


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images]).astype(np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def render_batch(scenes: Sequence[Scene], size: int) -> torch.Tensor:
    """``scenes`` rendered at ``size`` pixels, as :func:`images_to_tensor` gives them."""
    return images_to_tensor([render_scene(s, size) for s in scenes])
