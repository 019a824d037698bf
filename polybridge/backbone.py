"""The frozen English-native backbone: loading it, and the fingerprint a branch is checked against.

A backbone is a Stable Diffusion model in diffusers format: a local folder with the subfolders
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``, or a hub id with the same
layout. Weights are read from safetensors only (``use_safetensors=True``), a local folder is read
with ``local_files_only=True``, and every module comes back in eval mode with gradients off:
nothing in polybridge ever trains the backbone.

:func:`architecture_fingerprint` hashes the UNet config keys that fix the architecture (channels,
block types, widths, attention layout, ...), not the weights: a LoRA, a fine-tuned checkpoint of the
same architecture or a different scheduler keeps the fingerprint, a different UNet layout changes it.
Every saved branch records the fingerprint of the UNet it was built from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polybridge.registry import Registry, RegistryError, load_registry

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from polybridge.registry import BackboneSpec

#: UNet config keys that define its architecture (the layout of its weights and how they are used).
#: Keys absent from a config (older or newer diffusers) are skipped, so the hash stays stable.
#: ``sample_size`` is left out on purpose: a 768-px fine-tune of SD 1.5 has the same weights layout,
#: and a branch trained on SD 1.5 must plug into it.
FINGERPRINT_KEYS: tuple[str, ...] = (
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "dual_cross_attention",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
    "time_embedding_type",
    "time_embedding_dim",
    "time_embedding_act_fn",
    "timestep_post_act",
    "time_cond_proj_dim",
    "conv_in_kernel",
    "conv_out_kernel",
    "projection_class_embeddings_input_dim",
    "attention_type",
    "class_embeddings_concat",
    "mid_block_only_cross_attention",
    "cross_attention_norm",
    "addition_embed_type_num_heads",
)

#: The modules of a diffusers-format backbone folder, in the order they are loaded.
BACKBONE_SUBFOLDERS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

BUILD_HINT = "build the embedded default with `python scripts/build_default.py`"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def architecture_config(unet_or_config: Any) -> dict[str, Any]:
    """The architecture-defining subset of a UNet's config (a UNet, its ``.config`` or a plain dict)."""
    config = getattr(unet_or_config, "config", unet_or_config)
    return {key: _jsonable(config[key]) for key in FINGERPRINT_KEYS if key in config}


def architecture_fingerprint(unet_or_config: Any) -> str:
    """A short stable hash of the UNet architecture: equal for two UNets of one architecture, whatever their weights."""
    canonical = json.dumps(architecture_config(unet_or_config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def architecture_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two :func:`architecture_config` dicts: ``{key: (a, b)}``."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if _jsonable(a.get(k)) != _jsonable(b.get(k))}


@dataclass(frozen=True, eq=False)
class Backbone:
    """A loaded, frozen backbone: the five Stable Diffusion components plus where they came from."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: SchedulerMixin
    name: str = ""
    source: str = ""
    language: str = "en"

    @property
    def fingerprint(self) -> str:
        return architecture_fingerprint(self.unet)

    def components(self) -> dict[str, Any]:
        """The keyword arguments of a diffusers Stable Diffusion pipeline."""
        return {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "scheduler": self.scheduler}


#: What each registry ``architecture`` loads its text side with: (text encoder class, tokenizer class).
_TEXT_CLASSES: dict[str, tuple[str, str]] = {
    "sd1": ("CLIPTextModel", "CLIPTokenizer"),
    "sd2": ("CLIPTextModel", "CLIPTokenizer"),
}


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: how every frozen module in polybridge is held."""
    module.eval()
    module.requires_grad_(False)
    return module


def _raise_on_missing_weights(what: str, where: str, info: Mapping[str, Any] | None) -> None:
    # Loaders fill missing weights with random values and only log it; polybridge refuses instead.
    if not info:
        return
    missing = sorted(map(str, info.get("missing_keys") or []))
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"missing weights: {', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}")
        if mismatched:
            detail.append(f"weights of the wrong shape: {', '.join(str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched[:8])}")
        raise ValueError(f"{where}: {what} does not match its config ({'; '.join(detail)}); "
                         "refusing to run with randomly initialised weights")


def load_backbone(registry: Registry | str | Path | None = None, name: str | None = None,
                  torch_dtype: torch.dtype | None = None) -> Backbone:
    """Load backbone ``name`` (default: the registry's ``default_backbone``) from its source.

    ``registry`` is a loaded :class:`Registry`, a path to one, or ``None`` to find it
    (:func:`polybridge.registry.find_registry`).
    """
    import diffusers
    import transformers

    if not isinstance(registry, Registry):
        registry = load_registry(registry)
    spec: BackboneSpec = registry.backbone(name)
    source = registry.backbone_source(spec.name)
    local = isinstance(source, Path)
    if spec.architecture not in _TEXT_CLASSES:
        raise RegistryError(registry.file, f"backbones.{spec.name}.architecture",
                            f"no loader for architecture {spec.architecture!r}", valid=_TEXT_CLASSES)
    if local:
        if not source.is_dir():
            raise FileNotFoundError(f"backbone {spec.name!r}: folder {source} does not exist "
                                    f"(registry {registry.file}, key backbones.{spec.name}.source); {BUILD_HINT}")
        missing = [sub for sub in BACKBONE_SUBFOLDERS if not (source / sub).is_dir()]
        if missing:
            raise FileNotFoundError(f"backbone {spec.name!r}: {source} is not a diffusers-format model folder: "
                                    f"missing subfolder(s) {', '.join(missing)} (expected {', '.join(BACKBONE_SUBFOLDERS)}); "
                                    f"{BUILD_HINT}")
    where = str(source)
    common: dict[str, Any] = {"local_files_only": True} if local else {"revision": spec.revision}

    def _diffusers_model(cls: type, sub: str) -> Any:
        model, info = cls.from_pretrained(where, subfolder=sub, torch_dtype=torch_dtype, use_safetensors=True,
                                          output_loading_info=True, **common)
        _raise_on_missing_weights(cls.__name__, f"{where}/{sub}", info)
        return freeze(model)

    unet = _diffusers_model(diffusers.UNet2DConditionModel, "unet")
    vae = _diffusers_model(diffusers.AutoencoderKL, "vae")
    encoder_cls_name, tokenizer_cls_name = _TEXT_CLASSES[spec.architecture]
    encoder_cls = getattr(transformers, encoder_cls_name)
    text_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    text_encoder, info = encoder_cls.from_pretrained(where, subfolder="text_encoder", use_safetensors=True,
                                                     output_loading_info=True, **text_kwargs, **common)
    _raise_on_missing_weights(encoder_cls_name, f"{where}/text_encoder", info)
    freeze(text_encoder)
    tokenizer = getattr(transformers, tokenizer_cls_name).from_pretrained(where, subfolder="tokenizer", **common)
    scheduler_config = diffusers.DDPMScheduler.load_config(where, subfolder="scheduler", **common)
    scheduler_name = scheduler_config.get("_class_name")
    scheduler_cls = getattr(diffusers, str(scheduler_name), None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
        raise ValueError(f"{where}/scheduler/scheduler_config.json: _class_name: unknown scheduler {scheduler_name!r}; "
                         "valid: a diffusers scheduler class name, e.g. PNDMScheduler, DDIMScheduler")
    scheduler = scheduler_cls.from_config(scheduler_config)
    return Backbone(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    name=spec.name, source=where, language=spec.language)
