"""What every backbone family shares: the loaded :class:`Backbone`, the :class:`BackboneFamily` interface, loading
from the registry, and the architecture fingerprint a branch is checked against.

A backbone is a diffusers-format model (a local folder with one subfolder per component, or a hub id with the same
layout) of one **family** (``sd``: Stable Diffusion 1.x / 2.x; ``sdxl``), named by the registry's ``architecture``
(:mod:`polybridge.catalog`). A family is one module with one class: which components it has and how they load,
how a prompt becomes :class:`~polybridge.conditioning.Conditioning`, what else the UNet is conditioned on (SDXL's
size ids) and how the UNet is called. Weights are read from safetensors only (``use_safetensors=True``), a local
folder is read with ``local_files_only=True``, and every module comes back in eval mode with gradients off:
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
from typing import TYPE_CHECKING, Any, ClassVar

from polybridge import catalog
from polybridge.errors import PolyBridgeError, PolyBridgeFileNotFoundError
from polybridge.registry import Registry, load_registry

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from polybridge.conditioning import Conditioning
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



class BackboneError(PolyBridgeError, ValueError):
    """A backbone that cannot be loaded or used as its registry entry says; the message names the source and key."""


@dataclass(frozen=True, eq=False)
class Backbone:
    """A loaded, frozen backbone: its components plus where they came from and its family."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: SchedulerMixin
    name: str = ""
    source: str = ""
    language: str = "en"
    family: str = "sd"
    text_encoder_2: PreTrainedModel | None = None
    tokenizer_2: PreTrainedTokenizerBase | None = None

    @property
    def fingerprint(self) -> str:
        return architecture_fingerprint(self.unet)

    def components(self) -> dict[str, Any]:
        """The keyword arguments of the family's diffusers pipeline (and of ``PolyBridgePipeline``)."""
        return {name: getattr(self, name) for name in get_family(self.family).component_names()}

    def frozen_modules(self) -> list[Any]:
        """Every module with weights: the UNet, the VAE and the text encoder(s)."""
        return [self.unet, self.vae, *(getattr(self, a) for a, _ in get_family(self.family).text_encoders)]


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
        raise BackboneError(f"{where}: {what} does not match its config ({'; '.join(detail)}); "
                            "refusing to run with randomly initialised weights")


class BackboneFamily:
    """One backbone family: its components, how they load, how a prompt conditions its UNet, and the UNet call.

    A subclass sets :attr:`name` (its :mod:`polybridge.catalog` name), :attr:`text_encoders` and :attr:`tokenizers`,
    and implements :meth:`matches` and :meth:`encode_prompt`; SDXL-like families add :meth:`size_conditioning`."""

    name: ClassVar[str] = ""
    #: (attribute and subfolder, transformers class) of each text encoder / tokenizer, in pipeline order.
    text_encoders: ClassVar[tuple[tuple[str, str], ...]] = (("text_encoder", "CLIPTextModel"),)
    tokenizers: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "CLIPTokenizer"),)
    #: The diffusers pipeline class whose components these are (what ``from_pipe`` / a single file maps to).
    diffusers_pipeline: ClassVar[str] = ""

    @classmethod
    def component_names(cls) -> tuple[str, ...]:
        return ("vae", *(a for a, _ in cls.text_encoders), *(a for a, _ in cls.tokenizers), "unet", "scheduler")

    @classmethod
    def subfolders(cls) -> tuple[str, ...]:
        """The subfolders a diffusers-format folder of this family has."""
        return ("unet", "vae", *(a for a, _ in cls.text_encoders), *(a for a, _ in cls.tokenizers), "scheduler")

    @classmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        """Whether a UNet with this config belongs to the family."""
        raise NotImplementedError

    @classmethod
    def encode_prompt(cls, components: Any, texts: list[str], device: torch.device,
                      optional: list[bool] | None = None, clip_skip: int | None = None) -> Conditioning:
        """The backbone's conditioning for ``texts`` (one row each), as the family's diffusers pipeline encodes a
        prompt (``clip_skip``: layers skipped from the end, as there). ``components`` has the family's text encoders and tokenizers as attributes (a pipeline or a
        :class:`Backbone`). ``optional`` (default: the rows whose text is ``""``) marks rows whose context is a
        default that a branch's context replaces (:mod:`polybridge.conditioning`)."""
        raise NotImplementedError

    @classmethod
    def size_conditioning(cls, components: Any, batch: int, height: int, width: int, device: torch.device,
                          dtype: torch.dtype) -> Conditioning | None:
        """What the UNet is conditioned on besides text (SDXL's size and crop ids); ``None`` for none."""
        return None

    @classmethod
    def unet_call(cls, unet: Any, sample: torch.Tensor, timestep: Any, conditioning: Conditioning,
                  **extra: Any) -> torch.Tensor:
        """The UNet's noise prediction for a full-batch (composed) conditioning; ``extra``: further UNet keyword
        arguments (``cross_attention_kwargs``)."""
        return unet(sample, timestep, **conditioning.unet_kwargs(), **extra, return_dict=False)[0]

    @classmethod
    def check_unet(cls, unet: Any, where: str) -> None:
        """Refuse a UNet that is not of this family, naming the family it is."""
        if not cls.matches(unet.config):
            found = family_of_unet(unet)
            raise BackboneError(f"{where}: the UNet is {'an ' + found if found else 'of no known'} family backbone, "
                                f"but the registry names a {cls.name} architecture; set its architecture to one of "
                                f"{', '.join(a for a, f in catalog.ARCHITECTURES.items() if f == found) or '(none)'}")


def get_family(name: str) -> type[BackboneFamily]:
    """The family class registered as ``name`` (:mod:`polybridge.catalog`)."""
    try:
        return catalog.resolve("backbone_family", name)
    except catalog.UnknownName as exc:
        raise BackboneError(str(exc)) from None


def family_of_unet(unet_or_config: Any) -> str | None:
    """The name of the family a UNet (or its config, or an :func:`architecture_config` dict) belongs to."""
    config = getattr(unet_or_config, "config", unet_or_config)
    for name in catalog.names("backbone_family"):
        if get_family(name).matches(config):
            return name
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_snapshot(repo: str, revision: str | None, what: str, key: str) -> Path | str:
    """The local folder of ``repo`` in the Hugging Face cache, or ``repo`` itself when it is not cached and the
    hub can be reached (the loaders then download it). Offline (``HF_HUB_OFFLINE``, or no answer within 3 s) and
    not cached: one error naming the repository, the key and what to do, instead of retries that end in a
    misleading "config.json not found"."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError, or a malformed id the online path will name)
        pass
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else (
        None if hub_reachable() else f"{constants.ENDPOINT} does not answer")
    if offline:
        raise BackboneError(f"{what}: {repo!r} is a hub id that is not in the local Hugging Face cache, and the hub "
                            f"cannot be reached ({offline}); download it where there is a network (`hf download "
                            f"{repo}`) or point {key} at a local diffusers folder")
    return repo


def load_backbone(registry: Registry | str | Path | None = None, name: str | None = None,
                  torch_dtype: torch.dtype | None = None) -> Backbone:
    """Load backbone ``name`` (default: the registry's ``default_backbone``) from its source, with the family its
    ``architecture`` names.

    ``registry`` is a loaded :class:`Registry`, a path to one, or ``None`` to find it
    (:func:`polybridge.registry.find_registry`).
    """
    import diffusers
    import transformers

    if not isinstance(registry, Registry):
        registry = load_registry(registry)
    spec: BackboneSpec = registry.backbone(name)
    family = get_family(catalog.family_of_architecture(spec.architecture))
    source = registry.backbone_source(spec.name)
    local = isinstance(source, Path)
    key = f"registry {registry.file}, key backbones.{spec.name}"
    if local:
        if not source.is_dir():
            raise PolyBridgeFileNotFoundError(f"backbone {spec.name!r}: folder {source} does not exist "
                                              f"({key}.source); {BUILD_HINT}")
        missing = [sub for sub in family.subfolders() if not (source / sub).is_dir()]
        if missing:
            raise PolyBridgeFileNotFoundError(
                f"backbone {spec.name!r}: {source} is not a diffusers-format {family.name} model folder: missing "
                f"subfolder(s) {', '.join(missing)} (expected {', '.join(family.subfolders())}; {key}.architecture "
                f"is {spec.architecture!r}); {BUILD_HINT}")
    if not local:  # a hub id: its cached snapshot, or a clear error at once when the hub cannot be reached
        source = hub_snapshot(source, spec.revision, f"backbone {spec.name!r}", f"{key}.source")
        local = isinstance(source, Path)
    where = str(source)
    common: dict[str, Any] = {"local_files_only": True} if local else {"revision": spec.revision}

    def _diffusers_model(cls: type, sub: str) -> Any:
        model, info = cls.from_pretrained(where, subfolder=sub, torch_dtype=torch_dtype, use_safetensors=True,
                                          output_loading_info=True, variant=spec.variant, **common)
        _raise_on_missing_weights(cls.__name__, f"{where}/{sub}", info)
        return freeze(model)

    parts: dict[str, Any] = {"unet": _diffusers_model(diffusers.UNet2DConditionModel, "unet")}
    family.check_unet(parts["unet"], f"backbone {spec.name!r} ({where}/unet; {key}.architecture)")
    parts["vae"] = _diffusers_model(diffusers.AutoencoderKL, "vae")
    text_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    for sub, cls_name in family.text_encoders:
        model, info = getattr(transformers, cls_name).from_pretrained(
            where, subfolder=sub, use_safetensors=True, output_loading_info=True, variant=spec.variant, **text_kwargs,
            **common)
        _raise_on_missing_weights(cls_name, f"{where}/{sub}", info)
        parts[sub] = freeze(model)
    for sub, cls_name in family.tokenizers:
        parts[sub] = getattr(transformers, cls_name).from_pretrained(where, subfolder=sub, **common)
    scheduler_config = diffusers.DDPMScheduler.load_config(where, subfolder="scheduler", **common)
    scheduler_name = scheduler_config.get("_class_name")
    scheduler_cls = getattr(diffusers, str(scheduler_name), None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
        raise BackboneError(f"{where}/scheduler/scheduler_config.json: _class_name: unknown scheduler "
                            f"{scheduler_name!r}; valid: a diffusers scheduler class name, e.g. PNDMScheduler, "
                            "DDIMScheduler")
    parts["scheduler"] = scheduler_cls.from_config(scheduler_config)
    return Backbone(**parts, name=spec.name, source=where, language=spec.language, family=family.name)
