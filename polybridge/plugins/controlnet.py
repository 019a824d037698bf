"""ControlNet beside branches: one more source of :class:`~polybridge.conditioning.Conditioning`.

A ControlNet (``ControlNetModel`` or ``MultiControlNetModel``) reads the backbone's own text states of each row (the
English part of the prompt, or ``""``), never a branch's native states, and gives down / mid residuals for every
row; ``compose()`` sums them with the branches' residuals. Hint images, scales and the guidance window follow
``StableDiffusionControlNetPipeline``, so beside a zero branch the image is that pipeline's image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from polybridge.conditioning import Conditioning
from polybridge.plugins import PluginError

HINT_MODES = ("RGB", "RGBA", "L", "P")


def nets(controlnet: Any) -> list[Any]:
    """The single ControlNets inside ``controlnet`` (a MultiControlNetModel holds several)."""
    return list(getattr(controlnet, "nets", None) or [controlnet])


def check_fits(controlnet: Any, unet: Any, name: str = "controlnet") -> None:
    """Refuse a ControlNet made for another architecture than ``unet``'s, naming what would fit."""
    for i, net in enumerate(nets(controlnet)):
        for key in ("cross_attention_dim", "block_out_channels", "in_channels", "addition_embed_type"):
            theirs, ours = net.config.get(key), unet.config.get(key)
            if key == "block_out_channels":
                theirs, ours = list(theirs or []), list(ours or [])
            if theirs != ours:
                which = f"{name}[{i}]" if len(nets(controlnet)) > 1 else name
                raise PluginError(f"ControlNet {which!r} does not fit this backbone: its {key} is {theirs!r}, the "
                                  f"backbone UNet's is {ours!r}; use a ControlNet trained for this backbone's "
                                  f"architecture (one made with ControlNetModel.from_unet(pipe.unet) fits)")


def _check_hint(image: Any, index: int, height: int | None, width: int | None) -> None:
    what = f"image[{index}]"
    if isinstance(image, PIL.Image.Image):
        if image.mode not in HINT_MODES:
            raise PluginError(f"ControlNet hint {what}: PIL mode {image.mode!r} is not a hint image's; valid: "
                              f"{', '.join(HINT_MODES)} (convert it with image.convert('RGB'))")
        size = (image.height, image.width)
    elif torch.is_tensor(image):
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise PluginError(f"ControlNet hint {what}: a tensor hint is (3, H, W) or (B, 3, H, W), got "
                              f"{tuple(image.shape)}")
        size = tuple(image.shape[-2:])
    else:
        raise PluginError(f"ControlNet hint {what}: a PIL image or a tensor, got {type(image).__name__}")
    if height is not None and width is not None and size != (height, width):
        raise PluginError(f"ControlNet hint {what} is {size[1]}x{size[0]} (width x height), but the image to draw "
                          f"is {width}x{height}; give a hint of that size, or pass height= and width= to match it")


def hint_size(image: Any) -> tuple[int, int]:
    """(height, width) of the first hint image: the default image size when a hint is given."""
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, (list, tuple)):
        first = first[0]
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if torch.is_tensor(first):
        return int(first.shape[-2]), int(first.shape[-1])
    raise PluginError(f"ControlNet hint image: a PIL image or a tensor, got {type(first).__name__}")


def _as_per_net(value: Any, n: int, what: str) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise PluginError(f"{what}: {len(values)} values for {n} ControlNets; give one per ControlNet")
    return values


@dataclass
class ControlSource:
    """A prepared ControlNet for one call: its hint tensors (full, CFG-doubled batch), scales and keep per step."""

    controlnet: Any
    images: list[torch.Tensor]
    scales: list[float]
    keep: list[list[float]]  # per step, per net
    multi: bool

    @classmethod
    def prepare(cls, controlnet: Any, image: Any, *, batch: int, per_prompt: int, height: int, width: int,
                do_cfg: bool, scale: Any, start: Any, end: Any, steps: int, device: torch.device,
                dtype: torch.dtype, vae_scale_factor: int) -> ControlSource:
        n = len(nets(controlnet))
        multi = hasattr(controlnet, "nets")
        hints = list(image) if multi and isinstance(image, (list, tuple)) else [image]
        if len(hints) != n:
            raise PluginError(f"image: {len(hints)} hint images for {n} ControlNets; give one per ControlNet")
        processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        images = [cls._hint_tensor(processor, h, i, batch, per_prompt, height, width, do_cfg, device, dtype)
                  for i, h in enumerate(hints)]
        scales, starts, ends = (_as_per_net(v, n, w) for v, w in ((scale, "controlnet_conditioning_scale"),
                                (start, "control_guidance_start"), (end, "control_guidance_end")))
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise PluginError(f"control_guidance_start {s} / _end {e}: need 0 <= start < end <= 1")
        keep = [[1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(starts, ends)]
                for i in range(steps)]
        return cls(controlnet, images, [float(s) for s in scales], keep, multi)

    @staticmethod
    def _hint_tensor(processor: VaeImageProcessor, hint: Any, index: int, batch: int, per_prompt: int, height: int,
                     width: int, do_cfg: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        for one in (hint if isinstance(hint, (list, tuple)) else [hint]):
            _check_hint(one, index, height, width)
        tensor = processor.preprocess(hint, height=height, width=width).to(dtype=torch.float32)
        repeat = batch if tensor.shape[0] == 1 else per_prompt
        if tensor.shape[0] * repeat != batch:
            raise PluginError(f"ControlNet hint image[{index}]: {tensor.shape[0]} images for {batch // per_prompt} "
                              "prompts; give one hint, or one per prompt")
        tensor = tensor.repeat_interleave(repeat, dim=0).to(device=device, dtype=dtype)
        return torch.cat([tensor] * 2) if do_cfg else tensor

    def condition(self, sample: torch.Tensor, timestep: Any, step: int, backbone: Conditioning,
                  added: dict[str, torch.Tensor] | None = None) -> Conditioning:
        """The ControlNet residuals at ``step`` for the (scaled) model input, reading the backbone's text states."""
        scales: Sequence[float] = [c * k for c, k in zip(self.scales, self.keep[step])]
        kwargs: dict[str, Any] = {"added_cond_kwargs": added} if added else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=backbone.context,
                                    controlnet_cond=self.images if self.multi else self.images[0],
                                    conditioning_scale=list(scales) if self.multi else scales[0],
                                    guess_mode=False, return_dict=False, **kwargs)
        return Conditioning(down=tuple(down), mid=mid)
