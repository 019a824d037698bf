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


def make_ip_adapter(unet, folder: Path, seed: int = 0, image_width: int = 32) -> Path:
    """An IP-Adapter for ``unet`` (random; the standard kind: 4 image tokens) in diffusers' layout:
    ``folder/ip-adapter.safetensors`` (``image_proj.*``, ``ip_adapter.<n>.to_k_ip/to_v_ip.weight``) and a tiny
    ``CLIPVisionModelWithProjection`` in ``folder/image_encoder``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(4 * cross, image_width) * 0.2,
             "image_proj.proj.bias": torch.zeros(4 * cross),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    widths = list(unet.config.block_out_channels)
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[1]
        width = (widths[-1] if name.startswith("mid_block") else
                 list(reversed(widths))[int(block)] if name.startswith("up_blocks") else widths[int(block)])
        for part in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key}.{part}.weight"] = torch.randn(width, cross) * 0.2
        key += 2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "ip-adapter.safetensors"))
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=image_width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=32, patch_size=4))
    encoder.save_pretrained(folder / "image_encoder")
    return folder
