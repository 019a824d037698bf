"""Reading weights a user points polybridge at: safetensors only, and every value finite.

A zero-byte, truncated or foreign file, or one whose tensors hold NaN or inf (random bytes under a valid header
read as such), is a :class:`~polybridge.errors.PolyBridgeOSError` naming the file and what to do, never a
``SafetensorError`` traceback or a run that draws NaN images and says it succeeded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from polybridge.errors import PolyBridgeOSError


def read_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (``what``: e.g. "scorer weights", for the message), checked
    finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PolyBridgeOSError(f"{path}: {what} are not a readable safetensors file ({short(exc)}); the file is "
                                "empty, truncated or not safetensors: rebuild or re-download it") from None
    check_finite(tensors.items(), f"{path}: {what}")
    return tensors


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse tensors holding NaN or inf (floating-point ones; integer tensors are always finite), naming the
    first such tensor."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, tensor in items:
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise PolyBridgeOSError(f"{where}: tensor {name!r} holds NaN or inf values; these weights are corrupt "
                                    "(or were saved from a diverged run): rebuild or re-train them")


def short(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."
