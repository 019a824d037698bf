"""The ``pea`` branch: PEA-Diffusion's MLP adapter from native token states to the backbone's context.

``PEABranch.from_unet(unet, native_hidden_size)`` builds ``LayerNorm -> Linear -> GELU -> ... -> Linear`` from
the native encoder's width to the backbone UNet's ``cross_attention_dim``, applied to every token. Its output
*replaces* the backbone text encoder's states as the UNet's ``encoder_hidden_states`` (its conditioning is a
context, computed once per call: ``step_dependent`` is false); nothing of the backbone changes. With the defaults on Stable Diffusion 1.5 and a 1024-wide
encoder this is PEA's adapter: 1024 -> 2048 -> 2048 -> 768, no bias, about 7.9M parameters.

The last Linear starts at zero, so an untrained adapter gives an all-zero context: the UNet's cross-attention
then adds only its output bias, an image conditioned on nothing.

On an SDXL backbone the adapter also gives the pooled text embedding the UNet's added conditioning reads
(``text_embeds``), as PEA's SDXL adapter does: a Linear (zero at the start) from the mean of the normalised native
token states to the pooled width. Its context and pooled embedding replace the backbone's (branch conditioning of
:mod:`polybridge.conditioning`).

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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from polybridge.branches.base import Branch, BranchError, weighted_mse
from polybridge.conditioning import Conditioning

#: SDXL's size ids: 6 numbers, each embedded ``addition_time_embed_dim`` wide beside the pooled text.
_TIME_IDS = 6


class PEAOutput(NamedTuple):
    """An adapter with a pooled head (SDXL): the context and the pooled text embedding."""

    context: torch.Tensor
    pooled: torch.Tensor


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
    step_dependent = False
    distills = True
    untrained_effect = "the backbone reads an empty context"
    option_keys = ("hidden_size", "num_layers", "bias")

    @register_to_config
    def __init__(self, native_hidden_size: int = 1024, context_dim: int = 768, hidden_size: int = 2048,
                 num_layers: int = 3, bias: bool = False, layer_norm_eps: float = 1e-5, pooled_dim: int | None = None):
        super().__init__()
        if num_layers < 1:
            raise BranchError(f"num_layers must be at least 1 (the output Linear), got {num_layers}")
        self.norm = nn.LayerNorm(native_hidden_size, eps=layer_norm_eps)
        widths = [native_hidden_size] + [hidden_size] * (num_layers - 1) + [context_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.pooled = nn.Linear(native_hidden_size, pooled_dim, bias=bias) if pooled_dim else None
        for out in (self.mlp[-1], self.pooled):
            if out is None:
                continue
            nn.init.zeros_(out.weight)
            if out.bias is not None:
                nn.init.zeros_(out.bias)

    @classmethod
    def from_unet(cls, unet: Any, native_hidden_size: int, encoder_name: str = "", hidden_size: int | None = None,
                  num_layers: int = 3, bias: bool = False, **options: Any) -> PEABranch:
        """An adapter from ``native_hidden_size``-wide token states to ``unet``'s cross-attention width.

        ``hidden_size`` defaults to twice the wider of the two (2048 for a 1024-wide encoder on SD 1.5). On an SDXL
        UNet the adapter gets a pooled head as wide as the pooled text its added embedding reads.
        """
        cls.check_options(options)
        if not isinstance(native_hidden_size, int) or native_hidden_size < 1:
            raise BranchError(f"native_hidden_size must be a positive integer, got {native_hidden_size!r}")
        config = unet.config
        context_dim = config.cross_attention_dim
        if not isinstance(context_dim, int):
            raise BranchError(f"a pea branch needs one cross_attention_dim, the UNet has {context_dim!r}")
        pooled_dim = None
        added = config.get("addition_embed_type")
        if added == "text_time":
            pooled_dim = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim * _TIME_IDS
        elif added is not None:
            raise BranchError(f"a pea branch cannot condition a UNet with addition_embed_type={added!r}; "
                              "supported: None (sd), 'text_time' (sdxl)")
        hidden = int(hidden_size) if hidden_size is not None else 2 * max(native_hidden_size, context_dim)
        branch = cls(native_hidden_size=native_hidden_size, context_dim=context_dim, hidden_size=hidden,
                     num_layers=int(num_layers), bias=bool(bias), pooled_dim=pooled_dim)
        return branch.placed_for(unet, encoder_name, native_hidden_size)

    def condition(self, states: torch.Tensor, mask: torch.Tensor | None = None, *, sample: torch.Tensor | None = None,
                  timestep: Any = None, added: Any = None, scale: float = 1.0, rows: torch.Tensor | None = None,
                  call: Any = None) -> Conditioning:
        """The adapter's context (and on SDXL its pooled text), which replace the backbone's on its rows."""
        out = (call or self)(states, attention_mask=mask, conditioning_scale=scale)
        if isinstance(out, PEAOutput):
            return Conditioning(context=out.context, context_mask=mask, added={"text_embeds": out.pooled}, rows=rows)
        return Conditioning(context=out, context_mask=mask, rows=rows)

    def forward(self, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                conditioning_scale: float = 1.0) -> torch.Tensor | PEAOutput:
        """The backbone context ``(batch, tokens, cross_attention_dim)`` for native token states
        ``(batch, tokens, native_hidden_size)``. Masked tokens (``attention_mask`` 0) come out as zeros;
        the UNet is given the same mask as ``encoder_attention_mask``. With a pooled head (SDXL): a
        :class:`PEAOutput` of the context and the pooled text embedding ``(batch, pooled_dim)``."""
        normed = self.norm(encoder_hidden_states)
        context = self.mlp(normed) * conditioning_scale
        if attention_mask is not None:
            context = context * attention_mask.unsqueeze(-1).to(context.dtype)
        if self.pooled is None:
            return context
        if attention_mask is None:
            mean = normed.mean(dim=1)
        else:
            weight = attention_mask.unsqueeze(-1).to(normed.dtype)
            mean = (normed * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
        return PEAOutput(context, self.pooled(mean) * conditioning_scale)

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
            if isinstance(x, Mapping):  # added_cond_kwargs
                return {k: rows(v) for k, v in x.items()}
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
