"""The ``pea`` branch: PEA-Diffusion's MLP adapter from native token states to the backbone's context.

``PEABranch.from_unet(unet, native_hidden_size)`` builds ``LayerNorm -> Linear -> GELU -> ... -> Linear`` from
the native encoder's width to the backbone UNet's ``cross_attention_dim``, applied to every token. Its output
*replaces* the backbone text encoder's states as the UNet's ``encoder_hidden_states`` (branch ``kind``
``"context"``); nothing of the backbone changes. With the defaults on Stable Diffusion 1.5 and a 1024-wide
encoder this is PEA's adapter: 1024 -> 2048 -> 2048 -> 768, no bias, about 7.9M parameters.

The last Linear starts at zero, so an untrained adapter gives an all-zero context: the UNet's cross-attention
then adds only its output bias, an image conditioned on nothing.

Training (``polybridge train``, see :meth:`PEABranch.training_loss`): the denoising MSE, plus distillation from
the frozen backbone fed the English parallel caption through its own text encoder (the teacher) on the noise
prediction and on the hidden states after every down block, the mid block and every up block (forward hooks),
all features weighted equally, as in PEA-Diffusion (arXiv 2311.17086). Examples without a parallel caption
(native-only: PEA's source of culture-specific concepts, which an English teacher cannot draw) take the denoising
MSE alone. Gradients flow through the frozen UNet into the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from polybridge.branches.base import Branch, weighted_mse


def _first(output: Any) -> torch.Tensor:
    # Down blocks return (hidden_states, residuals); mid and up blocks return hidden_states.
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def block_outputs(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states after each down block, the mid block and each up block of ``unet``
    (in that order) while the context is open, with forward hooks that are removed on exit."""
    captured: list[torch.Tensor] = []
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    handles = [b.register_forward_hook(lambda _m, _args, out: captured.append(_first(out))) for b in blocks]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


class PEABranch(Branch):
    """A PEA adapter. Build it with :meth:`from_unet`; load a trained one with :meth:`from_pretrained`."""

    branch_type = "pea"
    kind = "context"
    distills = True
    option_keys = ("hidden_size", "num_layers", "bias")

    @register_to_config
    def __init__(self, native_hidden_size: int = 1024, context_dim: int = 768, hidden_size: int = 2048,
                 num_layers: int = 3, bias: bool = False, layer_norm_eps: float = 1e-5):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1 (the output Linear), got {num_layers}")
        self.norm = nn.LayerNorm(native_hidden_size, eps=layer_norm_eps)
        widths = [native_hidden_size] + [hidden_size] * (num_layers - 1) + [context_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        out = self.mlp[-1]
        nn.init.zeros_(out.weight)
        if out.bias is not None:
            nn.init.zeros_(out.bias)

    @classmethod
    def from_unet(cls, unet: Any, native_hidden_size: int, encoder_name: str = "", hidden_size: int | None = None,
                  num_layers: int = 3, bias: bool = False, **options: Any) -> PEABranch:
        """An adapter from ``native_hidden_size``-wide token states to ``unet``'s cross-attention width.

        ``hidden_size`` defaults to twice the wider of the two (2048 for a 1024-wide encoder on SD 1.5).
        """
        if options:
            raise TypeError(f"unknown pea branch option(s) {', '.join(sorted(options))}; "
                            f"valid: {', '.join(cls.option_keys)}")
        if not isinstance(native_hidden_size, int) or native_hidden_size < 1:
            raise ValueError(f"native_hidden_size must be a positive integer, got {native_hidden_size!r}")
        context_dim = unet.config.cross_attention_dim
        if not isinstance(context_dim, int):
            raise ValueError(f"a pea branch needs one cross_attention_dim, the UNet has {context_dim!r}")
        hidden = int(hidden_size) if hidden_size is not None else 2 * max(native_hidden_size, context_dim)
        branch = cls(native_hidden_size=native_hidden_size, context_dim=context_dim, hidden_size=hidden,
                     num_layers=int(num_layers), bias=bool(bias))
        return branch.placed_for(unet, encoder_name, native_hidden_size)

    def unet_inputs(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
                    mask: torch.Tensor | None, backbone_context: torch.Tensor,
                    call: Any = None) -> dict[str, Any]:
        """The adapter's context replaces the backbone's (``backbone_context`` is not read)."""
        context = (call or self)(states, attention_mask=mask)
        return {"encoder_hidden_states": context, "encoder_attention_mask": mask}

    def forward(self, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                conditioning_scale: float = 1.0) -> torch.Tensor:
        """The backbone context ``(batch, tokens, cross_attention_dim)`` for native token states
        ``(batch, tokens, native_hidden_size)``. Masked tokens (``attention_mask`` 0) come out as zeros;
        the UNet is given the same mask as ``encoder_attention_mask``."""
        context = self.mlp(self.norm(encoder_hidden_states)) * conditioning_scale
        if attention_mask is not None:
            context = context * attention_mask.unsqueeze(-1).to(context.dtype)
        return context

    @staticmethod
    def training_loss(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor,
                      student: Mapping[str, Any], teacher: Mapping[str, Any] | None,
                      weights: Mapping[str, float], sample_weights: torch.Tensor | None = None,
                      parallel: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """PEA's loss. ``student``/``teacher``: the UNet keyword arguments of the adapter's context and of the
        backbone's own text encoder on the English parallel caption (``None``: native-only data, denoising
        only). ``weights``: ``denoise`` (MSE to ``target``), ``distill_output`` (MSE to the teacher's noise
        prediction) and ``distill_features`` (sum over blocks of the MSE of their hidden states).
        ``parallel``: which examples have a parallel caption (bool, ``[batch]``; ``None``: all). The others are
        native-only: they take the denoising term alone, the teacher is not run on them, and the distillation
        terms are the mean over the batch with 0 for them (so an example weighs the same in any batch).
        ``sample_weights`` (min-SNR) weight the denoising term only; the distillation terms match the teacher
        at every noise level alike."""
        keep = None if parallel is None or bool(parallel.all()) else parallel.nonzero().squeeze(1)
        if teacher is None or (keep is not None and len(keep) == 0):
            parts = Branch.training_loss(unet, noisy, timesteps, target, student, None, weights, sample_weights)
            if teacher is not None:  # a batch of native-only examples: the same parts as any other batch
                zero = torch.zeros((), device=parts["loss"].device)
                parts.update(distill_output=zero, distill_features=zero)
            return parts

        def rows(x: Any) -> Any:
            return x if keep is None or not torch.is_tensor(x) or x.ndim == 0 else x[keep.to(x.device)]

        with torch.no_grad(), block_outputs(unet) as feats_t:
            pred_t = unet(rows(noisy), rows(timesteps), **{k: rows(v) for k, v in teacher.items()},
                          return_dict=False)[0]
        with block_outputs(unet) as feats_s:
            pred = unet(noisy, timesteps, **student, return_dict=False)[0]
        share = 1.0 if keep is None else len(keep) / noisy.shape[0]
        denoise = weighted_mse(pred, target, sample_weights)
        out = F.mse_loss(rows(pred).float(), pred_t.float()) * share
        feat = sum(F.mse_loss(rows(s).float(), t.float()) for s, t in zip(feats_s, feats_t, strict=True)) * share
        loss = weights.get("denoise", 1.0) * denoise + weights.get("distill_output", 1.0) * out \
            + weights.get("distill_features", 0.1) * feat
        return {"loss": loss, "denoise": denoise.detach(), "distill_output": out.detach(),
                "distill_features": feat.detach()}
