"""The ``sd`` family: Stable Diffusion 1.x and 2.x (the embedded default ``polybridge-tiny``, SD 1.5, SD 2.1).

One CLIP text encoder whose last hidden state is the UNet's cross-attention context; no added conditioning.
A prompt is encoded exactly as ``StableDiffusionPipeline.encode_prompt`` encodes it (padded to the tokenizer's
``model_max_length``, truncated beyond it with a warning), so the backbone side is bit-identical to diffusers'.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.loaders import TextualInversionLoaderMixin

from polybridge.backbones.base import BackboneFamily
from polybridge.conditioning import Conditioning


def encode_clip(tokenizer: Any, text_encoder: Any, texts: list[str], device: torch.device,
                hidden_state: int | None = None, components: Any = None) -> Any:
    """One CLIP text encoder's output for ``texts``, tokenized as diffusers' Stable Diffusion pipelines do (padded to
    ``model_max_length``; a longer prompt is truncated, with a warning). ``hidden_state``: also return all hidden
    states (SDXL reads the penultimate one). When ``components`` is a pipeline with Textual Inversion loaded, its
    multi-vector tokens are expanded first (``maybe_convert_prompt``), as diffusers' pipelines do."""
    if isinstance(components, TextualInversionLoaderMixin):
        texts = components.maybe_convert_prompt(texts, tokenizer)
    inputs = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    full = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > inputs.input_ids.shape[-1]:
        warnings.warn(f"an English prompt is longer than the backbone's {tokenizer.model_max_length} tokens and "
                      "was truncated", stacklevel=4)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(device)
    return text_encoder(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=hidden_state is not None)


def _optional(texts: list[str], optional: list[bool] | None, device: torch.device) -> torch.Tensor:
    flags = [text == "" for text in texts] if optional is None else list(optional)
    return torch.tensor(flags, dtype=torch.bool, device=device)


class SDFamily(BackboneFamily):
    """Stable Diffusion 1.x / 2.x: ``UNet2DConditionModel`` without added conditioning, one CLIP text encoder."""

    name = "sd"
    diffusers_pipeline = "StableDiffusionPipeline"

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return (unet_config.get("addition_embed_type") is None and unet_config.get("class_embed_type") is None
                and unet_config.get("encoder_hid_dim_type") is None)

    @classmethod
    def encode_prompt(cls, components: Any, texts: list[str], device: torch.device,
                      optional: list[bool] | None = None, clip_skip: int | None = None) -> Conditioning:
        out = encode_clip(components.tokenizer, components.text_encoder, list(texts), device,
                          hidden_state=None if clip_skip is None else -(clip_skip + 1), components=components)
        if clip_skip is None:
            embeds = out[0]
        else:  # the skipped-to layer through the final LayerNorm, as diffusers does (transformers 5 drops text_model)
            encoder = components.text_encoder
            embeds = getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        embeds = embeds.to(dtype=components.text_encoder.dtype, device=device)
        return Conditioning(context=embeds, optional=_optional(texts, optional, device))
