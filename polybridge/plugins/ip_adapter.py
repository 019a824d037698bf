"""IP-Adapter on the backbone: an image prompt beside any language's text.

diffusers' ``IPAdapterMixin`` loads the adapter into the backbone UNet (decoupled image cross-attention in each of
its cross-attention layers, an image projection as ``unet.encoder_hid_proj``) and a CLIP image encoder into the
pipeline. Branches are untouched: a bdm branch keeps its own attention (it reads the native text only) and its
residuals add to a UNet that now also reads the image; a pea adapter's context is the text part the UNet's image
tokens are appended to. :func:`ip_adapter_mismatches` checks an adapter's weights against the UNet before
anything is loaded; :func:`call_image_embeds` gives a call's ``image_embeds`` (CFG's negative half first, as the
rows); :func:`with_image_embeds` adds them to the UNet's conditioning.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from polybridge.conditioning import Conditioning
from polybridge.errors import PolyBridgeValueError
from polybridge.plugins import PluginError

#: The weights file of an IP-Adapter folder (diffusers' and the registry's default ``weight_name``).
WEIGHT_NAME = "ip-adapter.safetensors"


def has_ip_adapter(unet: Any) -> bool:
    """Whether an IP-Adapter is loaded into ``unet`` (diffusers marks it as an attribute of the config, not a key:
    the backbone's architecture and fingerprint stay the same)."""
    return (getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"
            and getattr(unet, "encoder_hid_proj", None) is not None)


def _cross_attention_layers(unet: Any) -> list[tuple[str, int]]:
    """(processor name, hidden width) of each of the UNet's cross-attention layers, in diffusers' loading order."""
    out = []
    widths = list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            width = widths[-1]
        elif name.startswith("up_blocks"):
            width = list(reversed(widths))[int(name.split(".")[1])]
        else:
            width = widths[int(name.split(".")[1])]
        out.append((name, width))
    return out


def ip_adapter_mismatches(state_dict: dict[str, dict[str, torch.Tensor]], unet: Any) -> list[str]:
    """Where an IP-Adapter state dict (``{"image_proj": ..., "ip_adapter": {"1.to_k_ip.weight": ...}}``) does not
    fit ``unet``: its image tokens' width, the number of cross-attention layers, each layer's widths."""
    if not isinstance(state_dict, dict) or not {"image_proj", "ip_adapter"} <= set(state_dict):
        return ["it has no 'image_proj' and 'ip_adapter' parts (not an IP-Adapter)"]
    cross = unet.config.cross_attention_dim
    problems = []
    proj = state_dict["image_proj"].get("proj.weight")
    if proj is not None and proj.ndim == 2 and proj.shape[0] % cross:
        problems.append(f"its image projection gives tokens {proj.shape[0] // 4} wide, the backbone's text is {cross}")
    layers = _cross_attention_layers(unet)
    keys = {int(k.split(".")[0]) for k in state_dict["ip_adapter"] if k.split(".")[0].isdigit()}
    if len(keys) != len(layers):
        problems.append(f"it adapts {len(keys)} cross-attention layers, the backbone has {len(layers)}")
        return problems
    for i, (name, width) in enumerate(layers):
        for part in ("to_k_ip", "to_v_ip"):
            weight = state_dict["ip_adapter"].get(f"{2 * i + 1}.{part}.weight")
            if weight is None or tuple(weight.shape) != (width, cross):
                found = "missing" if weight is None else f"{tuple(weight.shape)}"
                problems.append(f"{name.removesuffix('.processor')}.{part} is {found}, the backbone needs "
                                f"({width}, {cross})")
    return problems


def read_local(source: str | Path, subfolder: str, weight_name: str) -> dict[str, dict[str, torch.Tensor]] | None:
    """A local IP-Adapter file as diffusers splits it (``image_proj`` / ``ip_adapter``); ``None`` for a hub id."""
    if not Path(source).exists():
        return None
    path = Path(source) / (subfolder or "") / weight_name
    if not path.is_file():
        raise PluginError(f"IP-Adapter {source}: no weights file {path} (weight_name={weight_name!r}"
                          f"{f', subfolder={subfolder!r}' if subfolder else ''})")
    from polybridge.weights import read_safetensors

    if path.suffix != ".safetensors":
        raise PluginError(f"IP-Adapter {path}: only .safetensors files are read (convert a .bin with "
                          "safetensors.torch.save_file)")
    flat = read_safetensors(path, "IP-Adapter weights")
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part in state:
            state[part][rest] = value
    return state


def image_encoder_dir(source: str | Path, subfolder: str, image_encoder_folder: str) -> Path:
    """Where diffusers' ``load_ip_adapter`` reads the image encoder: under ``subfolder``, unless the folder is given
    as a path."""
    base = Path(source) if "/" in image_encoder_folder else Path(source) / (subfolder or "")
    return base / image_encoder_folder


def call_image_embeds(pipe: Any, image: Any, embeds: Any, images: int, do_cfg: bool,
                      device: torch.device) -> list[torch.Tensor] | None:
    """The UNet's ``image_embeds`` for a call of ``images`` images (one list entry per loaded adapter)."""
    loaded = has_ip_adapter(pipe.unet)
    if image is None and embeds is None:
        if loaded:
            raise PolyBridgeValueError("an IP-Adapter is loaded: give ip_adapter_image= (or ip_adapter_image_embeds=), "
                                       "or call pipe.unload_ip_adapter()")
        return None
    if not loaded:
        raise PolyBridgeValueError("ip_adapter_image / ip_adapter_image_embeds: no IP-Adapter is loaded; load one "
                                   "with pipe.load_ip_adapter(folder, subfolder=..., weight_name=...)")
    return pipe.prepare_ip_adapter_image_embeds(image, embeds, device, images, do_cfg)


def with_image_embeds(conditioning: Conditioning, image_embeds: list[torch.Tensor] | None) -> Conditioning:
    """``conditioning`` with the UNet's ``image_embeds`` added (the branches never read them)."""
    if image_embeds is None:
        return conditioning
    return dataclasses.replace(conditioning, added={**conditioning.added, "image_embeds": image_embeds})
