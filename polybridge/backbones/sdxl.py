"""The ``sdxl`` family: Stable Diffusion XL.

Two CLIP text encoders (``text_encoder``: ``CLIPTextModel``; ``text_encoder_2``: ``CLIPTextModelWithProjection``).
A prompt is encoded as ``StableDiffusionXLPipeline.encode_prompt`` encodes it: each encoder's penultimate hidden
state, concatenated along the width, is the context, and the second encoder's projected pooled output is the added
``text_embeds``. The UNet (``addition_embed_type: text_time``) also reads ``time_ids``: the original size, the
crop's top-left corner and the target size, here (height, width, 0, 0, height, width) as the SDXL pipeline's
defaults give them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from polybridge.backbones.base import BackboneError, BackboneFamily
from polybridge.backbones.sd import _optional, encode_clip
from polybridge.conditioning import Conditioning

#: What SDXL's ``time_ids`` hold: original size (2), crop top-left (2), target size (2).
TIME_IDS = 6


class SDXLFamily(BackboneFamily):
    """Stable Diffusion XL: ``UNet2DConditionModel`` with ``addition_embed_type='text_time'``, two text encoders."""

    name = "sdxl"
    diffusers_pipeline = "StableDiffusionXLPipeline"
    text_encoders = (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection"))
    tokenizers = (("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "CLIPTokenizer"))

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    @classmethod
    def encode_prompt(cls, components: Any, texts: list[str], device: torch.device,
                      optional: list[bool] | None = None, clip_skip: int | None = None) -> Conditioning:
        states, pooled = [], None
        layer = -2 if clip_skip is None else -(clip_skip + 2)
        for (enc_name, _), (tok_name, _) in zip(cls.text_encoders, cls.tokenizers, strict=True):
            out = encode_clip(getattr(components, tok_name), getattr(components, enc_name), list(texts), device,
                              hidden_state=layer, components=components)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled output
                pooled = out[0]
            states.append(out.hidden_states[layer])
        if pooled is None:
            raise BackboneError("sdxl: no text encoder gives a pooled embedding (text_encoder_2 must be a "
                                "CLIPTextModelWithProjection)")
        dtype = components.text_encoder_2.dtype
        context = torch.cat(states, dim=-1).to(dtype=dtype, device=device)
        return Conditioning(context=context, added={"text_embeds": pooled.to(dtype=dtype, device=device)},
                            optional=_optional(texts, optional, device))

    @classmethod
    def size_conditioning(cls, components: Any, batch: int, height: int, width: int, device: torch.device,
                          dtype: torch.dtype) -> Conditioning:
        expected = components.unet.add_embedding.linear_1.in_features
        given = components.unet.config.addition_time_embed_dim * TIME_IDS + components.text_encoder_2.config.projection_dim
        if expected != given:
            raise BackboneError(f"sdxl: the UNet's added embedding reads {expected} values, but its "
                                f"addition_time_embed_dim x {TIME_IDS} + text_encoder_2's projection_dim is {given}")
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
        return Conditioning(added={"time_ids": ids.expand(batch, -1)})
