"""Checkpoint swap: the backbone replaced by another checkpoint of the same architecture (a fine-tune, a single-file
model, a diffusers folder, an fp16 ``variant``), every language's branch kept.

The new UNet must have the architecture fingerprint the branches were built for
(:func:`polybridge.backbones.architecture_fingerprint`): weights may differ, the layout may not. Everything is
loaded and checked before the pipeline changes, so a refused checkpoint leaves it as it was.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from polybridge.backbones import (
    Backbone,
    architecture_config,
    architecture_diff,
    architecture_fingerprint,
    freeze,
)
from polybridge.plugins import PluginError
from polybridge.plugins.controlnet import check_fits


def load_checkpoint(family: Any, source: str | Path, *, variant: str | None = None, torch_dtype: Any = None,
                    config: str | Path | None = None) -> dict[str, Any]:
    """The backbone components of ``source``: a diffusers folder or hub id (``variant``: e.g. fp16), or a single
    ``.safetensors`` file (read with the family's diffusers pipeline's ``from_single_file``; ``config``: a
    diffusers folder of the same architecture, so nothing is fetched)."""
    import diffusers

    cls = getattr(diffusers, family.diffusers_pipeline)
    params = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in (("safety_checker", None), ("feature_extractor", None),
                               ("requires_safety_checker", False)) if k in params}
    path = Path(source)
    local = path.exists()
    try:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise PluginError(f"checkpoint {str(source)!r}: a single-file checkpoint must be .safetensors "
                                  "(polybridge never unpickles)")
            loaded = cls.from_single_file(str(path), config=None if config is None else str(config),
                                          local_files_only=True, torch_dtype=torch_dtype, **extra)
        else:
            loaded = cls.from_pretrained(str(source), variant=variant, torch_dtype=torch_dtype, use_safetensors=True,
                                         local_files_only=local, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, PluginError):
            raise
        raise PluginError(f"checkpoint {str(source)!r} cannot be loaded as a {family.name} backbone "
                          f"({family.diffusers_pipeline}): {str(exc).splitlines()[0]}") from None
    return {name: (freeze(part) if hasattr(part, "eval") and hasattr(part, "requires_grad_") else part)
            for name in family.component_names() if (part := getattr(loaded, name, None)) is not None}


def check_swap(pipe: Any, parts: dict[str, Any], what: str) -> None:
    """Refuse ``parts`` unless they are the pipeline's backbone architecture (so every branch still fits)."""
    unet = parts["unet"]
    ours, theirs = architecture_fingerprint(pipe.unet), architecture_fingerprint(unet)
    if not pipe.family.matches(unet.config) or ours != theirs:
        diff = architecture_diff(architecture_config(pipe.unet), architecture_config(unet))
        keys = "; ".join(f"{k}: {b!r} (backbone now: {a!r})" for k, (a, b) in list(diff.items())[:4])
        raise PluginError(f"checkpoint {what!r} is another architecture (fingerprint {theirs}; differing UNet keys: "
                          f"{keys}); this pipeline's branches were built for fingerprint {ours}: a fine-tune or "
                          f"another checkpoint of the same {pipe.family.name} architecture fits")
    for name, _ in pipe.family.text_encoders:
        old, new = getattr(pipe, name), parts.get(name)
        if new is None or new.config.hidden_size != old.config.hidden_size:
            raise PluginError(f"checkpoint {what!r}: its {name} is not the backbone's ({old.config.hidden_size} "
                              "wide); a checkpoint of the same architecture fits")
    for code, branch in pipe.branches.items():
        branch.check_backbone(unet, where=f"checkpoint {what!r}: language {code!r} branch")
    if pipe.controlnet is not None:
        check_fits(pipe.controlnet, unet)


def components_of(source: Any, pipe: Any, **kwargs: Any) -> tuple[dict[str, Any], str]:
    """The components to swap in and how to name them in messages."""
    if isinstance(source, Backbone):
        return source.components(), source.name
    return load_checkpoint(pipe.family, source, **kwargs), str(source)
