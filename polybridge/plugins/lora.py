"""LoRA per row: rows of one batch use different LoRA adapters (or none) in one denoising loop.

diffusers loads LoRA adapters into the backbone UNet through peft (``load_lora_weights(..., adapter_name=...)``).
peft's LoRA layers take ``adapter_names`` (one per row of their input; ``"__base__"``: no adapter) and then apply
each row's own adapter only (their "mixed batch" forward). While a call runs with ``lora_adapters=``, a forward
pre-hook on each LoRA layer of the UNet passes the rows' names (classifier-free guidance's negative half gets the
same names as its positive rows), so a row is drawn exactly as if its adapter alone were active. Branches are not
touched (they hold no LoRA layers). Per-row names reach the UNet's LoRA layers only: a LoRA that also adapts the
backbone's text encoder encodes every row's English text with the active adapters (``set_adapters``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from polybridge.plugins import PluginError

BASE = "__base__"


def lora_layers(module: Any) -> list[Any]:
    """The peft LoRA layers inside ``module``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def adapter_names_of(module: Any) -> list[str]:
    """The LoRA adapters loaded into ``module``."""
    return sorted({name for layer in lora_layers(module) for name in layer.lora_A})


def row_names(adapters: Sequence[str | None], prompts: int, per_prompt: int, do_cfg: bool,
              loaded: Sequence[str]) -> list[str]:
    """The per-row adapter names the LoRA layers get: one per image, doubled under classifier-free guidance."""
    adapters = list(adapters)
    if len(adapters) != prompts:
        raise PluginError(f"lora_adapters: {len(adapters)} names for {prompts} prompts; give one per prompt "
                          "(None: no LoRA on that row)")
    unknown = [a for a in adapters if a is not None and a not in loaded]
    if unknown:
        raise PluginError(f"lora_adapters: LoRA adapter(s) {', '.join(map(repr, unknown))} are not loaded; loaded: "
                          f"{', '.join(loaded) or '(none: load one with pipe.load_lora_weights(..., adapter_name=NAME))'}")
    names = [BASE if a is None else a for a in adapters for _ in range(per_prompt)]
    return names * 2 if do_cfg else names


@contextlib.contextmanager
def per_row_adapters(unet: Any, adapters: Sequence[str | None] | None, prompts: int, per_prompt: int,
                     do_cfg: bool) -> Iterator[None]:
    """While in the block, each of ``unet``'s LoRA layers applies each row's adapter (``None``: as it is)."""
    if adapters is None:
        yield
        return
    layers = lora_layers(unet)
    names = row_names(adapters, prompts, per_prompt, do_cfg, adapter_names_of(unet))
    if any(getattr(layer, "merged", False) for layer in layers):
        raise PluginError("lora_adapters: a LoRA is fused into the backbone; call pipe.unfuse_lora() first")

    def hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
