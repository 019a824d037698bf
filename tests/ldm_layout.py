"""A Stable Diffusion backbone's weights in the original (LDM / CompVis) single-file layout, as community checkpoints
are published (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), written from
diffusers components for the tests: nothing is downloaded. diffusers' ``from_single_file`` reads it back to the same
weights (``tests/test_single_file.py`` checks that first)."""
from __future__ import annotations

import torch

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _move(out, state, src, dst, renames=None, reshape=False):
    """Every tensor under ``src.`` renamed to ``dst.`` (the first name after it through ``renames``)."""
    for key, value in state.items():
        if not key.startswith(src + "."):
            continue
        rest = key[len(src) + 1:]
        if renames:
            head, _, tail = rest.partition(".")
            rest = f"{renames.get(head, head)}.{tail}"
        if reshape and value.ndim == 2:
            value = value[:, :, None, None]
        out[f"{dst}.{rest}"] = value


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    s, cfg, out = unet.state_dict(), unet.config, {}
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    p = "model.diffusion_model"
    _move(out, s, "time_embedding.linear_1", f"{p}.time_embed.0")
    _move(out, s, "time_embedding.linear_2", f"{p}.time_embed.2")
    _move(out, s, "conv_in", f"{p}.input_blocks.0.0")
    k = 1
    for i in range(n):
        for j in range(layers):
            _move(out, s, f"down_blocks.{i}.resnets.{j}", f"{p}.input_blocks.{k}.0", _RESNET_UNET)
            _move(out, s, f"down_blocks.{i}.attentions.{j}", f"{p}.input_blocks.{k}.1")
            k += 1
        if i < n - 1:
            _move(out, s, f"down_blocks.{i}.downsamplers.0.conv", f"{p}.input_blocks.{k}.0.op")
            k += 1
    _move(out, s, "mid_block.resnets.0", f"{p}.middle_block.0", _RESNET_UNET)
    _move(out, s, "mid_block.attentions.0", f"{p}.middle_block.1")
    _move(out, s, "mid_block.resnets.1", f"{p}.middle_block.2", _RESNET_UNET)
    k = 0
    for i in range(n):
        has_attn = any(key.startswith(f"up_blocks.{i}.attentions.") for key in s)
        for j in range(layers + 1):
            _move(out, s, f"up_blocks.{i}.resnets.{j}", f"{p}.output_blocks.{k}.0", _RESNET_UNET)
            _move(out, s, f"up_blocks.{i}.attentions.{j}", f"{p}.output_blocks.{k}.1")
            if j == layers and i < n - 1:
                _move(out, s, f"up_blocks.{i}.upsamplers.0.conv", f"{p}.output_blocks.{k}.{2 if has_attn else 1}.conv")
            k += 1
    _move(out, s, "conv_norm_out", f"{p}.out.0")
    _move(out, s, "conv_out", f"{p}.out.2")
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in s.values())
    return out


_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_attn(out, s, src, dst):
    for key, value in s.items():
        if key.startswith(src + "."):
            rest = key[len(src) + 1:].replace("to_out.0", "to_out")
            head, _, tail = rest.partition(".")
            out[f"{dst}.{_ATTN_VAE[head]}.{tail}"] = value[:, :, None, None] if value.ndim == 2 else value


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    s, cfg, out, p = vae.state_dict(), vae.config, {}, "first_stage_model"
    n = len(cfg.block_out_channels)
    for part in ("encoder", "decoder"):
        _move(out, s, f"{part}.conv_in", f"{p}.{part}.conv_in")
        _move(out, s, f"{part}.conv_norm_out", f"{p}.{part}.norm_out")
        _move(out, s, f"{part}.conv_out", f"{p}.{part}.conv_out")
        _move(out, s, f"{part}.mid_block.resnets.0", f"{p}.{part}.mid.block_1", _RESNET_VAE)
        _move(out, s, f"{part}.mid_block.resnets.1", f"{p}.{part}.mid.block_2", _RESNET_VAE)
        _vae_attn(out, s, f"{part}.mid_block.attentions.0", f"{p}.{part}.mid.attn_1")
    for i in range(n):
        for j in range(cfg.layers_per_block):
            _move(out, s, f"encoder.down_blocks.{i}.resnets.{j}", f"{p}.encoder.down.{i}.block.{j}", _RESNET_VAE)
        _move(out, s, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"{p}.encoder.down.{i}.downsample.conv")
        for j in range(cfg.layers_per_block + 1):
            _move(out, s, f"decoder.up_blocks.{i}.resnets.{j}", f"{p}.decoder.up.{n - 1 - i}.block.{j}", _RESNET_VAE)
        _move(out, s, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{p}.decoder.up.{n - 1 - i}.upsample.conv")
    _move(out, s, "quant_conv", f"{p}.quant_conv")
    _move(out, s, "post_quant_conv", f"{p}.post_quant_conv")
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in s.values()), "vae"
    return out


def text_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    return {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in text_encoder.state_dict().items()}


def to_ldm_file(components: dict, path) -> None:
    """``components``' UNet, VAE and text encoder as one original-layout ``.safetensors`` file."""
    from safetensors.torch import save_file

    state = {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"]),
             **text_to_ldm(components["text_encoder"])}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
