"""Resumable training state: module weights as safetensors, optimizer state, and the step.

A checkpoint folder is written atomically (see :mod:`polybridge.atomic`), so a kill at any moment
leaves either the previous checkpoint or the new one, never half of one. Data order is a pure
function of (seed, step) everywhere in polybridge, so the step is all a resumed run needs to
continue with the same batches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polybridge.atomic import atomic_dir
from polybridge.errors import PolyBridgeFileNotFoundError, PolyBridgeValueError

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


def save_checkpoint(folder: str | Path, modules: Mapping[str, torch.nn.Module], step: int,
                    optimizer: torch.optim.Optimizer | None = None,
                    lr_scheduler: Any | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder`` (replacing it atomically): one ``<name>.safetensors`` per module, optimizer, state."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=True) as tmp:
        for name, module in modules.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        if optimizer is not None:
            payload = {"optimizer": optimizer.state_dict()}
            if lr_scheduler is not None:
                payload["lr_scheduler"] = lr_scheduler.state_dict()
            torch.save(payload, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    return folder


def load_checkpoint(folder: str | Path, modules: Mapping[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any | None = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects; returns its state."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise PolyBridgeFileNotFoundError(f"{state_file}: no checkpoint state here")
    for name, module in modules.items():
        path = folder / f"{name}.safetensors"
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for missing or corrupt files
            raise PolyBridgeValueError(f"{path}: cannot read checkpoint weights ({exc})") from None
        module.load_state_dict(tensors)
    if optimizer is not None and (folder / OPTIMIZER_FILE).is_file():
        payload = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
        optimizer.load_state_dict(payload["optimizer"])
        if lr_scheduler is not None and "lr_scheduler" in payload:
            lr_scheduler.load_state_dict(payload["lr_scheduler"])
    return json.loads(state_file.read_text())


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of the checkpoint in ``folder``, or None when there is none."""
    state_file = Path(folder) / STATE_FILE
    if not state_file.is_file():
        return None
    return int(json.loads(state_file.read_text())["step"])
