"""The ``bdm`` branch: Bridge Diffusion's ControlNet-like copy of the backbone UNet's encoder half.

``BDMBranch.from_unet(unet, native_hidden_size)`` builds, from the backbone UNet's config and with the
same diffusers blocks, a copy of its ``conv_in``, time embedding, down blocks and mid block, whose
cross-attention reads the native encoder's token states (``cross_attention_dim = native_hidden_size``).
Weights are copied wherever the shapes match; the cross-attention ``to_k`` / ``to_v`` take the native
width, so they start fresh when it differs from the backbone's (as BDM's do). There is no hint image.
On an SDXL UNet (``addition_embed_type: text_time``) the branch carries the UNet's added embedding too
(``add_time_proj``, ``add_embedding``, copied), as diffusers' ``ControlNetModel.from_unet`` does, and reads the
backbone's added conditioning (pooled text of the English part, size ids) as the UNet does.

Every down-block residual and the mid-block output pass through a zero-initialised 1x1 conv and are
scaled by ``conditioning_scale``; the result is exactly what the backbone UNet takes as
``down_block_additional_residuals`` / ``mid_block_additional_residual``. An untrained branch outputs
zeros, so it changes nothing. Module names follow diffusers' ``ControlNetModel``
(``controlnet_down_blocks``, ``controlnet_mid_block``), as BDM's released ``ControlNetModelBDM`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block
from torch import nn

from polybridge.branches.base import Branch, BranchError, BranchOutput
from polybridge.conditioning import Conditioning

#: UNet config keys the branch copies as they are (its own constructor arguments of the same name).
_COPIED_KEYS: tuple[str, ...] = (
    "in_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
    "act_fn", "norm_num_groups", "norm_eps", "transformer_layers_per_block", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "upcast_attention", "resnet_time_scale_shift",
    "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_dim", "time_embedding_act_fn",
    "timestep_post_act", "conv_in_kernel", "attention_type", "mid_block_only_cross_attention",
    "cross_attention_norm", "dropout", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)

#: UNet features a bdm branch does not copy (SDXL-style conditioning and the like): key -> supported values.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text_time"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "class_embeddings_concat": (False,),
    "dual_cross_attention": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
}


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _copy_matching(dst: nn.Module, src: nn.Module) -> list[str]:
    """Copy every tensor of ``src`` into ``dst`` whose name and shape match; return the names left fresh."""
    src_state = src.state_dict()
    fresh, matched = [], {}
    for name, tensor in dst.state_dict().items():
        if name in src_state and src_state[name].shape == tensor.shape:
            matched[name] = src_state[name]
        else:
            fresh.append(name)
    dst.load_state_dict(matched, strict=False)
    return fresh


class BDMBranch(Branch, AttentionMixin):
    """A BDM branch. Build it with :meth:`from_unet`; load a trained one with :meth:`from_pretrained`."""

    branch_type = "bdm"
    untrained_effect = "the image is the backbone's for the English prompt, \"\" by default"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                             "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        conv_in_kernel: int = 3,
        attention_type: str = "default",
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        dropout: float = 0.0,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
    ):
        super().__init__()
        self.fresh_keys: list[str] = []  # weights from_unet could not copy (set by from_unet)
        n = len(down_block_types)
        if len(block_out_channels) != n:
            raise BranchError(f"block_out_channels {tuple(block_out_channels)} and down_block_types "
                             f"{tuple(down_block_types)} must have the same length")
        # diffusers' historical naming: attention_head_dim is the number of heads unless both are given.
        num_attention_heads = num_attention_heads or attention_head_dim
        if isinstance(only_cross_attention, bool):
            if mid_block_only_cross_attention is None:
                mid_block_only_cross_attention = only_cross_attention
        mid_block_only_cross_attention = bool(mid_block_only_cross_attention)
        only_cross_attention = _per_block(only_cross_attention, n)
        heads = _per_block(num_attention_heads, n)
        head_dims = _per_block(attention_head_dim, n)
        layers = _per_block(layers_per_block, n)
        transformer_layers = _per_block(transformer_layers_per_block, n)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=conv_in_kernel,
                                 padding=(conv_in_kernel - 1) // 2)
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn,
                                                post_act_fn=timestep_post_act)
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn else None
        if addition_embed_type == "text_time":  # SDXL: pooled text + size ids, as the UNet embeds them
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif addition_embed_type is not None:
            raise BranchError(f"addition_embed_type {addition_embed_type!r} is not supported; valid: None, 'text_time'")

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])  # conv_in's residual
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            block = get_down_block(
                block_type,
                num_layers=layers[i],
                transformer_layers_per_block=transformer_layers[i],
                in_channels=input_channel,
                out_channels=output_channel,
                temb_channels=time_embed_dim,
                add_downsample=i < n - 1,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim,
                num_attention_heads=heads[i],
                downsample_padding=downsample_padding,
                dual_cross_attention=False,
                use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross_attention[i],
                upcast_attention=upcast_attention,
                resnet_time_scale_shift=resnet_time_scale_shift,
                attention_type=attention_type,
                resnet_skip_time_act=resnet_skip_time_act,
                resnet_out_scale_factor=resnet_out_scale_factor,
                cross_attention_norm=cross_attention_norm,
                attention_head_dim=head_dims[i] if head_dims[i] is not None else output_channel,
                dropout=dropout,
            )
            self.down_blocks.append(block)
            # One residual per resnet and one per downsampler, exactly as the UNet collects them.
            n_res = len(block.resnets) + (len(block.downsamplers) if getattr(block, "downsamplers", None) else 0)
            self.controlnet_down_blocks.extend(_zero_conv(output_channel) for _ in range(n_res))

        self.mid_block = get_mid_block(
            mid_block_type,
            temb_channels=time_embed_dim,
            in_channels=block_out_channels[-1],
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=transformer_layers[-1],
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_attention_dim,
            dual_cross_attention=False,
            use_linear_projection=use_linear_projection,
            mid_block_only_cross_attention=mid_block_only_cross_attention,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_type=attention_type,
            resnet_skip_time_act=resnet_skip_time_act,
            cross_attention_norm=cross_attention_norm,
            attention_head_dim=head_dims[-1],
            dropout=dropout,
        )
        self.controlnet_mid_block = _zero_conv(block_out_channels[-1])

    @classmethod
    def from_unet(cls, unet: Any, native_hidden_size: int, encoder_name: str = "",
                  load_weights_from_unet: bool = True, **options: Any) -> BDMBranch:
        """A branch for ``unet`` whose cross-attention reads ``native_hidden_size``-wide token states.

        Weights are copied from the UNet wherever the shapes match (everything but the cross-attention
        ``to_k`` / ``to_v`` when the widths differ); the output convs are zero, so the branch changes nothing
        until trained. ``encoder_name`` is recorded in the config.
        """
        cls.check_options(options)
        if not isinstance(native_hidden_size, int) or native_hidden_size < 1:
            raise BranchError(f"native_hidden_size must be a positive integer, got {native_hidden_size!r}")
        config = unet.config
        for key, allowed in _UNSUPPORTED.items():
            if key in config and config[key] not in allowed:
                raise BranchError(f"a bdm branch cannot copy a UNet with {key}={config[key]!r} (supported: "
                                  f"{', '.join(map(repr, allowed))}); bdm supports sd (1.x/2.x) and sdxl UNets")
        kwargs = {k: config[k] for k in _COPIED_KEYS if k in config}
        branch = cls(**kwargs, cross_attention_dim=native_hidden_size)
        if load_weights_from_unet:
            copied = ("conv_in", "time_embedding", "down_blocks", "mid_block")
            if config.get("addition_embed_type") == "text_time":
                copied += ("add_embedding",)
            for name in copied:
                fresh = _copy_matching(getattr(branch, name), getattr(unet, name))
                branch.fresh_keys += [f"{name}.{k}" for k in fresh]
        return branch.placed_for(unet, encoder_name, native_hidden_size)

    def condition(self, states: torch.Tensor, mask: torch.Tensor | None = None, *, sample: torch.Tensor | None = None,
                  timestep: Any = None, added: Any = None, scale: float = 1.0, rows: torch.Tensor | None = None,
                  call: Any = None) -> Conditioning:
        """The branch's residuals for the backbone's down and mid blocks (the backbone reads its own context)."""
        down, mid = (call or self)(sample, timestep, states, conditioning_scale=scale, attention_mask=mask,
                                   added_cond_kwargs=added)
        return Conditioning(down=tuple(down), mid=mid, rows=rows)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        conditioning_scale: float = 1.0,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> BranchOutput:
        """Residuals for the backbone UNet.

        ``encoder_hidden_states`` are the native encoder's token states ``(batch, tokens, native_hidden_size)``;
        ``attention_mask`` ``(batch, tokens)`` is 1 on tokens to attend to and 0 on tokens to ignore;
        ``added_cond_kwargs`` (SDXL: ``text_embeds`` and ``time_ids``) is what the backbone UNet reads too.
        """
        mask = None
        if attention_mask is not None:
            mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type == "mps":
                dtype = torch.float32 if isinstance(timestep, float) else torch.int32
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))
        if self.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise BranchError("a bdm branch of an sdxl backbone needs added_cond_kwargs with 'text_embeds' and "
                                  "'time_ids' (the backbone's added conditioning of its rows)")
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        sample = self.conv_in(sample)
        residuals: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    encoder_attention_mask=mask)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals += tuple(res)
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states,
                                    encoder_attention_mask=mask)
        else:
            sample = self.mid_block(sample, emb)

        down = tuple(conv(r) * conditioning_scale for r, conv in zip(residuals, self.controlnet_down_blocks, strict=True))
        mid = self.controlnet_mid_block(sample) * conditioning_scale
        return BranchOutput(down, mid)
