"""Plugins made in code for the tests (nothing downloaded): LoRA folders, Textual Inversion files, ControlNets."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from safetensors.torch import save_file


def make_lora(unet, folder: Path, seed: int = 0, targets=("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """A LoRA for ``unet`` (random, non-zero B) saved in diffusers' format at ``folder``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder


def make_ti(path: Path, token: str, vectors: int = 2, width: int = 32, seed: int = 0) -> Path:
    """A Textual Inversion embedding (diffusers' one-key format) of ``vectors`` vectors."""
    gen = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: torch.randn(vectors, width, generator=gen)}, str(path))
    return path


def make_controlnet(unet, seed: int = 0) -> ControlNetModel:
    """A ControlNet for ``unet`` with non-zero outputs (as trained), tiny conditioning embedding."""
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()
