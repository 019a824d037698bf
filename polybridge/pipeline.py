"""``PolyBridgePipeline``: one frozen backbone, any number of native languages, one denoising loop.

Each prompt row has a language. For the backbone's own language (``en``) the prompt goes to the
backbone's text encoder and no branch runs. For a native language the native prompt goes to that
language's encoder and branch, whose residuals (times ``branch_scale``) are added to the backbone
UNet's down and mid blocks, while the backbone's text encoder reads ``english_prompt`` (``""`` by
default, as BDM trains it). Classifier-free guidance runs the negative prompt through both paths:
``""`` to the backbone's text encoder, the native negative prompt to the branch, as BDM's released
script does. All rows of one call share one backbone UNet call per step; each branch runs on its rows.
A pea branch instead replaces the backbone's text states on its rows by its adapter's output (followed by the
backbone's states of ``english_prompt`` when that is not empty); it runs once per call. The pipeline does not know
branch types: every source (the backbone's prompt encoding, its size conditioning, each branch) gives a
:class:`~polybridge.conditioning.Conditioning` and :func:`~polybridge.conditioning.compose` makes the UNet's inputs,
as in the trainer; a branch whose conditioning depends on the noisy sample (``step_dependent``) runs at every step.
The backbone's family (:mod:`polybridge.backbones`: ``sd``, ``sdxl``) encodes the English text and calls the UNet.

Everything on the backbone side is Stable Diffusion's own computation, so with an untrained
(zero-output) branch the pipeline gives exactly what ``StableDiffusionPipeline`` gives for ``""``.

Languages whose registry entry has no trained branch follow the entry's ``fallback``:
``zero-branch`` runs a zero-initialised branch (and warns that the language is untrained),
``backbone`` sends the native text to the backbone's text encoder as it is, ``error`` refuses.

With ``language=None`` the pipeline routes each prompt itself (:mod:`polybridge.router`): English spans
(and whatever falls back to the backbone) go into the backbone's prompt, each native language's spans to its
branch. Two native languages in one prompt run both branches on that row, each fed its own text, their
residuals summed (as diffusers' MultiControlNet does). The negative prompt is routed the same way, so a
branch that only the negative prompt names runs on that row with ``""`` as its positive text.
``english_prompt`` is appended to the routed English text.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    MultiControlNetModel,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import (
    USE_PEFT_BACKEND,
    BaseOutput,
    scale_lora_layers,
    unscale_lora_layers,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from polybridge.backbones import (
    Backbone,
    BackboneError,
    family_of_unet,
    get_family,
    load_backbone,
)
from polybridge.branches import Branch, get_branch_class, load_branch
from polybridge.conditioning import Conditioning, compose, concat
from polybridge.encoders import NativeEncoder, load_encoder
from polybridge.errors import (
    PolyBridgeFileNotFoundError,
    PolyBridgeTypeError,
    PolyBridgeValueError,
)
from polybridge.plugins import controlnet as cn
from polybridge.plugins import ip_adapter as ip
from polybridge.plugins import lora as row_lora
from polybridge.plugins.loaders import CheckedLoaders
from polybridge.registry import LanguageEntry, Registry, RegistryError, load_registry
from polybridge.router import RoutePlan, Router

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TRAIN_HINT = "train it with `polybridge train --lang {code}`"


class LanguageModules(torch.nn.ModuleDict):
    """Per-language modules (native encoders, branches) keyed by language code; moves with the pipeline."""

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


@dataclass(frozen=True)
class LoadedLanguage:
    """How a language's prompts are handled in this pipeline."""

    code: str
    route: str  # "branch": native encoder + branch; "backbone": the text goes to the backbone's text encoder
    scale: float = 1.0
    trained: bool = True


@dataclass
class PolyBridgePipelineOutput(BaseOutput):
    """``images``: PIL images, a numpy array or a tensor (latents for ``output_type="latent"``);
    ``languages``: the language each image was generated for."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    languages: list[str]
    plans: list[RoutePlan] | None = None  # with language=None: the router's plan of each image's prompt


@dataclass
class _Row:
    """What one prompt row feeds each path: the backbone's text (and negative), and per branch (positive,
    negative); ``label`` is the language reported for it (``zh``, ``en+zh``, ...)."""

    label: str
    backbone: str
    backbone_negative: str
    branches: dict[str, tuple[str, str]]
    plan: RoutePlan | None = None


@dataclass
class _Run:
    """One call's options that the denoising loop reads (beyond the conditioning)."""

    guidance_scale: float
    do_cfg: bool
    generator: Any = None
    eta: float = 0.0
    guidance_rescale: float = 0.0
    cross_attention_kwargs: dict[str, Any] | None = None
    clip_skip: int | None = None
    callback: Any = None
    callback_inputs: tuple[str, ...] = ("latents",)
    control: cn.ControlSource | None = None
    backbone: Conditioning | None = None  # the backbone's own prompt encoding: what a ControlNet reads
    image_embeds: list[torch.Tensor] | None = None  # an IP-Adapter's image prompt, per adapter (the UNet reads it)


@dataclass
class _BranchRows:
    code: str
    rows: torch.Tensor | None  # indices into the (CFG-doubled) batch; None: every row
    states: torch.Tensor
    mask: torch.Tensor | None
    scale: float


class PolyBridgePipeline(DiffusionPipeline, CheckedLoaders, StableDiffusionLoraLoaderMixin,
                         TextualInversionLoaderMixin, FromSingleFileMixin, IPAdapterMixin):
    """Text-to-image with one frozen English backbone and native-language branches.

    diffusers' loader mixins (LoRA, Textual Inversion, IP-Adapter, single file) act on the backbone only; a
    ``controlnet`` component (``ControlNetModel`` / ``MultiControlNetModel``) conditions every row beside the branches.

    Build it with :meth:`from_registry`, or from components and :meth:`add_language`::

        pipe = PolyBridgePipeline.from_registry(languages=["zh"])
        image = pipe("红色的灯笼", language="zh", num_inference_steps=25).images[0]
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["encoders", "branches", "text_encoder_2", "tokenizer_2", "controlnet",  # noqa: RUF012
                            "image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]  # noqa: RUF012 (diffusers' own)

    def __init__(self, vae: AutoencoderKL, text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin, encoders: LanguageModules | None = None,
                 branches: LanguageModules | None = None, backbone_language: str = "en",
                 text_encoder_2: PreTrainedModel | None = None, tokenizer_2: PreTrainedTokenizerBase | None = None,
                 controlnet: ControlNetModel | MultiControlNetModel | None = None, image_encoder: Any = None,
                 feature_extractor: Any = None):
        super().__init__()
        if controlnet is not None:
            controlnet = self._fitting_controlnet(controlnet, unet)
        family = family_of_unet(unet)
        if family is None:
            raise BackboneError("PolyBridgePipeline: the UNet belongs to no known backbone family (its config has "
                                f"addition_embed_type={unet.config.get('addition_embed_type')!r}); known: "
                                "sd (SD 1.x/2.x), sdxl")
        self.family = get_family(family)
        given = {"text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}
        missing = [name for name in self.family.component_names() if name in given and given[name] is None]
        if missing:
            raise BackboneError(f"PolyBridgePipeline: an {family} backbone needs {', '.join(missing)}")
        # SDXL's second text side; None on the other families (as diffusers' optional components are)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              encoders=LanguageModules(), branches=LanguageModules(), controlnet=controlnet,
                              image_encoder=image_encoder, feature_extractor=feature_extractor, **given)
        self.register_to_config(backbone_language=backbone_language)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.registry: Registry | None = None
        self.backbone_name: str | None = None  # the registry backbone, when built from a registry
        self._base_router: Router | None = None  # given, or built from the registry on first use
        self._router: Router | None = None  # the base router with this pipeline's loaded languages as targets
        self._languages: dict[str, LoadedLanguage] = {backbone_language: LoadedLanguage(backbone_language, "backbone")}
        for code in (encoders or {}):
            if branches is None or code not in branches:
                raise PolyBridgeValueError(f"language {code!r} has an encoder but no branch")
            self.add_language(code, encoders[code], branches[code])
        for code in (branches or {}):
            if encoders is None or code not in encoders:
                raise PolyBridgeValueError(f"language {code!r} has a branch but no encoder")

    # ------------------------------------------------------------------ building

    @classmethod
    def from_registry(cls, registry: Registry | str | Path | None = None, languages: list[str] | None = None,
                      backbone: str | Backbone | None = None, torch_dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> PolyBridgePipeline:
        """Load the backbone and, for each requested language (default: every registered one), its
        native encoder and branch. A language without trained branch weights follows its ``fallback``.

        ``backbone`` is a backbone name from the registry (default: ``default_backbone``) or an
        already loaded :class:`~polybridge.backbones.Backbone`.
        """
        if not isinstance(registry, Registry):
            registry = load_registry(registry)
        if isinstance(backbone, Backbone):
            bb = backbone
        else:
            bb = load_backbone(registry, backbone, torch_dtype=torch_dtype)
        codes = list(registry.codes if languages is None else languages)
        for code in codes:
            registry.language(code)  # unknown codes: RegistryError listing the valid ones
        pipe = cls(**bb.components(), backbone_language=bb.language)
        pipe.registry = registry
        pipe.backbone_name = bb.name  # the registry backbone it runs (plugins name the one they fit)
        for code in dict.fromkeys(codes):
            entry = registry.language(code)
            if code == bb.language or entry.is_backbone_language:
                continue
            pipe._load_language(entry, torch_dtype)
        if device is not None:
            pipe.to(device)
        return pipe

    def _load_language(self, entry: LanguageEntry, torch_dtype: torch.dtype | None) -> None:
        assert entry.branch is not None and entry.encoder is not None
        code, spec = entry.code, entry.branch
        source = entry.branch_source
        present = source is not None and (isinstance(source, str) or source.exists())
        if present:
            encoder = load_encoder(entry, torch_dtype=torch_dtype)
            branch = load_branch(source, self.unet, torch_dtype)
            if branch.branch_type != spec.type:
                raise RegistryError(entry.file, "branch.type", f"the branch at {source} is a {branch.branch_type!r} "
                                    f"branch, but the entry says {spec.type!r}", valid=[branch.branch_type])
            self.add_language(code, encoder, branch, scale=spec.scale)
            return
        where = f"{source}" if source is not None else "(branch.weights is null)"
        untrained = f"language {code!r} ({entry.name}) has no trained branch: {where} ({entry.file}, key branch.weights)"
        if entry.fallback == "error":
            raise PolyBridgeFileNotFoundError(f"{untrained}; its fallback is 'error'; {TRAIN_HINT.format(code=code)}")
        if entry.fallback == "backbone":
            warnings.warn(f"{untrained}; fallback 'backbone': its prompts go as they are to the backbone's "
                          f"English text encoder; {TRAIN_HINT.format(code=code)}", stacklevel=3)
            self.add_language(code, scale=spec.scale, trained=False)
            return
        branch_cls = get_branch_class(spec.type)
        branch_cls.check_options(spec.options, where=f"{entry.file}: branch.options.")
        encoder = load_encoder(entry, torch_dtype=torch_dtype)
        branch = branch_cls.from_unet(self.unet, encoder.hidden_size, encoder_name=entry.encoder.source, **spec.options)
        warnings.warn(f"{untrained}. It is UNTRAINED: it runs a zero-initialised branch, so its prompts have no "
                      f"effect ({branch.untrained_effect}); {TRAIN_HINT.format(code=code)}", stacklevel=3)
        self.add_language(code, encoder, branch, scale=spec.scale, trained=False)

    def add_language(self, code: str, encoder: NativeEncoder | None = None, branch: Branch | None = None,
                     scale: float = 1.0, trained: bool = True) -> None:
        """Add (or replace) a language: with an encoder and a branch, or with neither (its text then goes
        to the backbone's text encoder). The branch must have been built for this backbone."""
        if code == self.config.backbone_language:
            raise PolyBridgeValueError(f"{code!r} is the backbone's language; it needs no encoder or branch")
        self._router = None  # targets change with the loaded languages
        if (encoder is None) != (branch is None):
            raise PolyBridgeValueError(f"language {code!r}: give both an encoder and a branch, or neither")
        for modules in (self.encoders, self.branches):
            if code in modules:
                del modules[code]
        if encoder is None:
            self._languages[code] = LoadedLanguage(code, "backbone", float(scale), trained)
            return
        branch.check_backbone(self.unet, where=f"language {code!r} branch")
        if branch.encoder_hidden_size is not None and branch.encoder_hidden_size != encoder.hidden_size:
            raise PolyBridgeValueError(f"language {code!r}: the branch reads {branch.encoder_hidden_size}-wide token states, "
                             f"but encoder {encoder.name!r} gives {encoder.hidden_size}")
        if branch.encoder_name and encoder.name and branch.encoder_name != encoder.name:
            warnings.warn(f"language {code!r}: the branch was built for encoder {branch.encoder_name!r}, "
                          f"but {encoder.name!r} is loaded", stacklevel=2)
        self.encoders[code] = encoder
        self.branches[code] = branch
        self._languages[code] = LoadedLanguage(code, "branch", float(scale), trained)

    @property
    def languages(self) -> dict[str, LoadedLanguage]:
        """The languages this pipeline can generate for, backbone language included."""
        return dict(self._languages)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PolyBridgePipeline:
        """A pipeline :meth:`save_pretrained` wrote (rebuilt offline, every language with it; ``languages=``,
        ``torch_dtype=``, ``device=`` as :meth:`from_registry`), or a diffusers-format backbone with no languages."""
        from polybridge.saving import load_pipeline

        return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | Path, family: str = "sd",
                         **kwargs: Any) -> PolyBridgePipeline:
        """A backbone from one ``.safetensors`` checkpoint, read by the ``family``'s diffusers pipeline
        (``config=``: a diffusers folder of the same architecture, so nothing is fetched); no languages yet."""
        import diffusers

        if Path(pretrained_model_link_or_path).suffix != ".safetensors":
            raise PolyBridgeValueError(f"{pretrained_model_link_or_path}: a single-file checkpoint must be "
                                       ".safetensors (polybridge never unpickles)")
        pipeline_cls = getattr(diffusers, get_family(family).diffusers_pipeline)
        return cls.from_pipe(pipeline_cls.from_single_file(str(pretrained_model_link_or_path), **kwargs))

    def save_pretrained(self, save_directory: str | Path, overwrite: bool = False, **kwargs: Any) -> None:
        """Write the whole pipeline (backbone, encoders, tokenizers, branches, the languages' entries) as a
        self-contained registry folder (:mod:`polybridge.saving`); :meth:`from_pretrained` reads it back."""
        from polybridge.saving import save_pipeline

        unknown = set(kwargs) - {"safe_serialization"}
        if unknown or kwargs.get("safe_serialization", True) is False:
            raise PolyBridgeValueError(f"save_pretrained: unsupported argument(s) {sorted(unknown or kwargs)}; "
                                       "polybridge saves safetensors only")
        if ip.has_ip_adapter(self.unet):
            raise PolyBridgeValueError("save_pretrained: an IP-Adapter is loaded into the backbone UNet; call "
                                       "pipe.unload_ip_adapter() first (an IP-Adapter stays its own folder, loaded "
                                       "again with load_ip_adapter)")
        save_pipeline(self, save_directory, overwrite=overwrite)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload, with every native encoder and branch hooked too (each moves to the accelerator
        when it runs and back when the next model does)."""
        from accelerate import cpu_offload_with_hook

        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        for module in [*self.encoders.values(), *self.branches.values()]:
            _, hook = cpu_offload_with_hook(module, self._offload_device)
            self._all_hooks.append(hook)

    def swap_backbone(self, source: Backbone | str | Path, *, variant: str | None = None,
                      torch_dtype: torch.dtype | None = None, config: str | Path | None = None) -> None:
        """Replace the backbone by another checkpoint of the same architecture (a loaded
        :class:`~polybridge.backbones.Backbone`, a diffusers folder or hub id with an optional ``variant``, or a
        single ``.safetensors`` file read with ``config``), keeping every language's branch. Another architecture
        is refused and the pipeline stays as it was (:mod:`polybridge.plugins.checkpoint`)."""
        from polybridge.plugins.checkpoint import check_swap, components_of

        parts, what = components_of(source, self, variant=variant, torch_dtype=torch_dtype, config=config)
        check_swap(self, parts, what)
        self.register_modules(**parts)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ routing

    @property
    def router(self) -> Router:
        """The router for ``language=None``: the registry's (or the one set here), with this pipeline's loaded
        languages as targets (a registered language that is not loaded is ``not-loaded``)."""
        if self._router is None:
            base = self._base_router
            if base is None:
                if self.registry is None:
                    raise PolyBridgeValueError("language=None: routing needs a router, and this pipeline was built from "
                                     "components without a registry; set pipe.router = polybridge.router.Router(...), "
                                     "build it with PolyBridgePipeline.from_registry(), or pass language= one of "
                                     f"{', '.join(self._languages)}")
                base = self._base_router = Router.from_registry(self.registry)
            routes = {code: self._languages[code].route if code in self._languages else "not-loaded"
                      for code in base.languages}
            untrained = [code for code, state in self._languages.items() if not state.trained]
            self._router = base.with_routes(routes, untrained)
        return self._router

    @router.setter
    def router(self, router: Router | None) -> None:
        self._base_router = router
        self._router = None

    def route(self, prompts: str | list[str]) -> list[RoutePlan]:
        """The router's plan of each prompt: spans, languages, confidences and where each span goes."""
        return self.router.plan_many(_as_list(prompts, "prompt"))

    def resolve_languages(self, prompts: list[str], language: str | None) -> list[str]:
        """The language of each prompt row: ``language``, or with ``language=None`` the router's label
        (``zh``, ``en+zh``, ...)."""
        if language is None:
            return [plan.label for plan in self.route(prompts)]
        self._check_language(language)
        return [language] * len(prompts)

    def _rows(self, prompts: list[str], negatives: list[str], englishes: list[str],
              language: str | list[str | None] | None) -> list[_Row]:
        """What each prompt row feeds the backbone and each branch. ``language`` may be a list, one code (or ``None``:
        routed) per prompt, so that prompts in different languages share one call (``polybridge serve`` does)."""
        if isinstance(language, (list, tuple)):
            if len(language) != len(prompts):
                raise PolyBridgeValueError(f"language: {len(language)} codes for {len(prompts)} prompts; give one "
                                           "code (or None: routed) per prompt, or a single code")
            placed: list[_Row | None] = [None] * len(prompts)
            for code in dict.fromkeys(language):
                on = [i for i, c in enumerate(language) if c == code]
                picked = self._rows([prompts[i] for i in on], [negatives[i] for i in on], [englishes[i] for i in on],
                                    code)
                for i, row in zip(on, picked):
                    placed[i] = row
            return placed  # type: ignore[return-value]
        if language is not None:  # one language for every row: the prompt goes to its branch, or to the backbone
            rows = []
            for code, text, neg, eng in zip(self.resolve_languages(prompts, language), prompts, negatives, englishes):
                if self._languages[code].route == "backbone":
                    if eng:
                        raise PolyBridgeValueError(f"english_prompt is for prompts that run a branch; {code!r} prompts go to the "
                                         "backbone's text encoder themselves, so pass the English text as the prompt")
                    rows.append(_Row(code, text, neg, {}))
                else:
                    rows.append(_Row(code, eng, "", {code: (text, neg)}))
            return rows
        rows = []
        for i, (plan, neg_plan, eng) in enumerate(zip(self.route(prompts), self.route(negatives), englishes)):
            for what, p in (("prompt", plan), ("negative_prompt", neg_plan)):
                for span in p.problems():
                    loaded = ", ".join(self._languages)
                    hint = (f"load it with PolyBridgePipeline.from_registry(languages=[..., {span.language!r}])"
                            if span.target == "not-loaded" else "its fallback is 'error'")
                    raise PolyBridgeValueError(f"{what} {i} ({p.prompt!r}): {span.text!r} is {span.language!r} "
                                     f"({span.how}, confidence {span.confidence:.2f}), which this pipeline cannot run "
                                     f"(loaded: {loaded}); {hint}, or pass language=")
            backbone = ", ".join(t for t in (plan.backbone_text, eng) if t)
            codes = dict.fromkeys([*plan.branch_texts, *neg_plan.branch_texts])
            branches = {c: (plan.branch_texts.get(c, ""), neg_plan.branch_texts.get(c, "")) for c in codes}
            rows.append(_Row(plan.label, backbone, neg_plan.backbone_text, branches, plan))
        return rows

    def _check_language(self, code: str) -> None:
        if code in self._languages:
            return
        loaded = ", ".join(self._languages)
        if self.registry is not None:
            self.registry.language(code)  # not registered at all: RegistryError listing the valid codes
            raise PolyBridgeValueError(f"language {code!r} is registered but not loaded in this pipeline (loaded: {loaded}); "
                             f"load it with PolyBridgePipeline.from_registry(languages=[..., {code!r}])")
        raise RegistryError("PolyBridgePipeline", "language", f"unknown language code {code!r}", valid=self._languages)

    # ------------------------------------------------------------------ generation

    def _encode_backbone(self, texts: list[str], device: torch.device, optional: list[bool] | None = None,
                         clip_skip: int | None = None, lora_scale: float | None = None) -> Conditioning:
        """The backbone's conditioning for ``texts``: its family's prompt encoding, the same computation as its
        diffusers pipeline's ``encode_prompt`` (Textual Inversion tokens expanded, ``clip_skip``, the LoRA scale on
        the text encoders), so the backbone side is bit-identical."""
        encoders = [getattr(self, name) for name, _ in self.family.text_encoders]
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        for encoder in encoders if scaled else ():
            scale_lora_layers(encoder, lora_scale)
        try:
            return self.family.encode_prompt(self, texts, device, optional=optional, clip_skip=clip_skip)
        finally:
            for encoder in encoders if scaled else ():
                unscale_lora_layers(encoder, lora_scale)

    def _branch_inputs(self, rows: list[_Row], do_cfg: bool, branch_scale: float | None,
                       device: torch.device) -> list[_BranchRows]:
        """Each branch's rows (a row with spans in two languages is in both) and its encoder's states of their
        texts (with CFG: the negative half, then the positive one)."""
        batch = len(rows)
        items: list[_BranchRows] = []
        for code in dict.fromkeys(code for row in rows for code in row.branches):
            on = [i for i, row in enumerate(rows) if code in row.branches]
            texts = [rows[i].branches[code][0] for i in on]
            if do_cfg:
                texts = [rows[i].branches[code][1] for i in on] + texts
                on = on + [i + batch for i in on]
            encoder, branch = self.encoders[code], self.branches[code]
            states, mask = encoder.encode_with_mask(texts)
            scale = self._languages[code].scale if branch_scale is None else branch_scale
            items.append(_BranchRows(
                code=code, rows=None if len(on) == batch * (2 if do_cfg else 1) else torch.tensor(on, device=device),
                states=states.to(device=device, dtype=branch.dtype),
                mask=None if mask is None else mask.to(device), scale=float(scale)))
        return items

    def _given_embeds(self, embeds: dict[str, torch.Tensor | None], prefix: str,
                      device: torch.device) -> Conditioning:
        """The caller's ``{prefix}prompt_embeds`` (and on SDXL ``{prefix}pooled_prompt_embeds``) as the backbone's
        conditioning, as diffusers' pipelines take them."""
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        added = {}
        if self.family.name == "sdxl":
            pooled = embeds.get(f"{prefix}pooled_prompt_embeds")
            if pooled is None:
                raise PolyBridgeValueError(f"{prefix}prompt_embeds on an sdxl backbone needs "
                                           f"{prefix}pooled_prompt_embeds too (as StableDiffusionXLPipeline)")
            added = {"text_embeds": pooled.to(device=device, dtype=dtype)}
        return Conditioning(context=embeds[f"{prefix}prompt_embeds"].to(device=device, dtype=dtype), added=added)

    def _backbone_conditioning(self, rows: list[_Row], run: _Run, device: torch.device,
                               embeds: dict[str, torch.Tensor | None]) -> Conditioning:
        """The backbone's own encoding of every row (CFG's negative half first); ``embeds``: the caller's
        ``prompt_embeds`` / ``negative_prompt_embeds`` (and pooled ones) in place of the English texts' encoding."""
        lora_scale = (run.cross_attention_kwargs or {}).get("scale")
        texts = [row.backbone for row in rows]
        given = embeds.get("prompt_embeds") is not None
        if given:
            backbone = self._given_embeds(embeds, "", device)
        else:
            backbone = self._encode_backbone(texts, device, clip_skip=run.clip_skip, lora_scale=lora_scale)
        if not run.do_cfg:
            return backbone
        if embeds.get("negative_prompt_embeds") is not None:
            negative = self._given_embeds(embeds, "negative_", device)
        else:  # a negative row keeps the backbone's states where its positive row does
            optional = [not text for text in texts] if not given else [False] * len(rows)
            negative = self._encode_backbone([row.backbone_negative for row in rows], device, optional=optional,
                                             clip_skip=run.clip_skip, lora_scale=lora_scale)
        return concat([negative, backbone])

    def _call_conditioning(self, rows: list[_Row], items: list[_BranchRows], run: _Run, height: int, width: int,
                           device: torch.device, embeds: dict[str, Any] | None = None) -> Conditioning:
        """What stays the same at every step, composed: the branches that do not depend on the step (their contexts
        first), the backbone's prompt encoding (its English text; CFG's negative half first), its size conditioning.
        The backbone's own encoding is kept in ``run.backbone`` (a ControlNet reads it)."""
        backbone = self._backbone_conditioning(rows, run, device, embeds or {})
        dtype = backbone.context.dtype
        parts = [self.branches[item.code].condition(item.states, item.mask, scale=item.scale, rows=item.rows).to(dtype)
                 for item in items if not self.branches[item.code].step_dependent]
        total = len(rows) * (2 if run.do_cfg else 1)
        size = self.family.size_conditioning(self, total, height, width, device, dtype)
        run.backbone = compose([backbone, size], total)
        return compose([*parts, backbone, size], total)

    def _step_conditioning(self, base: Conditioning, sample: torch.Tensor, t: torch.Tensor,
                           items: list[_BranchRows]) -> Conditioning:
        """``base`` plus what the step-dependent branches give for this step's ``sample``, each on its rows only."""
        parts = [base]
        for item in items:
            branch = self.branches[item.code]
            if not branch.step_dependent:
                continue
            x = sample if item.rows is None else sample.index_select(0, item.rows)
            added = {k: v.to(branch.dtype) for k, v in base.select(item.rows).added.items()} or None
            cond = branch.condition(item.states, item.mask, sample=x.to(branch.dtype), timestep=t, added=added,
                                    scale=item.scale, rows=item.rows)
            parts.append(cond.to(self.unet.dtype))
        return base if len(parts) == 1 else compose(parts, sample.shape[0])

    def _control_conditioning(self, conditioning: Conditioning, sample: torch.Tensor, t: torch.Tensor, step: int,
                              run: _Run) -> Conditioning:
        """``conditioning`` plus the ControlNet's residuals for this step (it reads the backbone's own text states of
        every row), composed as one more source."""
        if run.control is None:
            return conditioning
        control = run.control.condition(sample, t, step, run.backbone, dict(run.backbone.added) or None)
        return compose([conditioning, control], sample.shape[0])
    def _check_call(self, prompt: Any, num_inference_steps: Any, guidance_scale: Any, branch_scale: Any,
                    num_images_per_prompt: Any, output_type: str, height: int | None,
                    width: int | None) -> tuple[list[str], int, int]:
        """The prompts and the image size, once every argument is checked."""
        prompts = _as_list(prompt, "prompt")
        if not prompts:
            raise PolyBridgeValueError("prompt: the list is empty; give at least one prompt (\"\" is the unconditional one)")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise PolyBridgeValueError(f"num_inference_steps must be an integer of at least 1, got {num_inference_steps!r}")
        if not _is_number(guidance_scale) or guidance_scale < 0:
            raise PolyBridgeValueError(f"guidance_scale must be a number of at least 0, got {guidance_scale!r}")
        if branch_scale is not None and not _is_number(branch_scale):
            raise PolyBridgeValueError(f"branch_scale must be a finite number or None, got {branch_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise PolyBridgeValueError(f"num_images_per_prompt must be an integer of at least 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise PolyBridgeValueError(f"output_type {output_type!r} is not supported; valid: {', '.join(OUTPUT_TYPES)}")
        sample_size = self.unet.config.sample_size
        default_h, default_w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        height = height or default_h * self.vae_scale_factor
        width = width or default_w * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise PolyBridgeValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        from polybridge import limits

        limits.check_int(num_inference_steps, "num_inference_steps", 1, limits.MAX_INFERENCE_STEPS)
        limits.check_float(guidance_scale, "guidance_scale", 0.0, limits.MAX_GUIDANCE)
        if branch_scale is not None:
            limits.check_float(branch_scale, "branch_scale", 0.0, limits.MAX_BRANCH_SCALE)
        limits.check_int(height, "height", 1, limits.MAX_IMAGE_SIZE)
        limits.check_int(width, "width", 1, limits.MAX_IMAGE_SIZE)
        limits.check_int(len(prompts) * num_images_per_prompt, "images (prompts x num_images_per_prompt)", 1,
                         limits.MAX_IMAGES)
        return prompts, height, width

    def _denoise(self, latents: torch.Tensor, base: Conditioning, items: list[_BranchRows], run: _Run,
                 timesteps: torch.Tensor) -> torch.Tensor:
        """The scheduler loop: one backbone UNet call per step for the whole (CFG-doubled) batch."""
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = run.eta
        if "generator" in step_params:
            step_kwargs["generator"] = run.generator
        extra = {"cross_attention_kwargs": run.cross_attention_kwargs} if run.cross_attention_kwargs else {}
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents] * 2) if run.do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                conditioning = self._step_conditioning(base, model_input, t, items)
                conditioning = self._control_conditioning(conditioning, model_input, t, i, run)
                conditioning = ip.with_image_embeds(conditioning, run.image_embeds)
                noise = self.family.unet_call(self.unet, model_input, t, conditioning, **extra)
                if run.do_cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + run.guidance_scale * (noise_text - noise_uncond)
                    if run.guidance_rescale > 0.0:
                        noise = rescale_noise_cfg(noise, noise_text, guidance_rescale=run.guidance_rescale)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if run.callback is not None:
                    latents, base = self._on_step_end(run, i, t, latents, base)
                progress.update()
        if not torch.isfinite(latents).all():
            raise PolyBridgeValueError("generation produced non-finite latents (NaN or inf): a branch's weights or "
                                       "scale, or guidance_scale, is out of range; check `polybridge registry "
                                       "validate` and the branch weights")
        return latents

    def _on_step_end(self, run: _Run, i: int, t: torch.Tensor, latents: torch.Tensor,
                     base: Conditioning) -> tuple[torch.Tensor, Conditioning]:
        """``callback_on_step_end``: it sees ``latents`` and the composed text states (``prompt_embeds``; CFG's
        negative half as ``negative_prompt_embeds``) and may replace them, as in diffusers' pipelines."""
        context = base.context
        negative = context.chunk(2)[0] if run.do_cfg else None
        values = {"latents": latents, "prompt_embeds": context, "negative_prompt_embeds": negative}
        out = run.callback(self, i, t, {k: values[k] for k in run.callback_inputs}) or {}
        latents = out.get("latents", latents)
        context = out.get("prompt_embeds", context)
        if "negative_prompt_embeds" in out and run.do_cfg:
            context = torch.cat([out["negative_prompt_embeds"], context.chunk(2)[1]])
        if context is not base.context:
            base = Conditioning(context=context, context_mask=base.context_mask, added=base.added, down=base.down,
                                mid=base.mid)
        return latents, base

    # ------------------------------------------------------------------ what a call sets (as diffusers' pipelines)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._do_cfg

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    def _start_run(self, guidance_scale: float, generator: Any, options: dict[str, Any]) -> _Run:
        """The call's :class:`_Run`, its options checked and published as the pipeline's properties."""
        inputs = tuple(options.get("callback_on_step_end_tensor_inputs") or ("latents",))
        unknown = [k for k in inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise PolyBridgeValueError(f"callback_on_step_end_tensor_inputs: {unknown} are not available; valid: "
                                       f"{', '.join(self._callback_tensor_inputs)}")
        do_cfg = guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None
        run = _Run(guidance_scale=guidance_scale, do_cfg=do_cfg, generator=generator, eta=options.get("eta", 0.0),
                   guidance_rescale=options.get("guidance_rescale", 0.0),
                   cross_attention_kwargs=options.get("cross_attention_kwargs"), clip_skip=options.get("clip_skip"),
                   callback=options.get("callback_on_step_end"), callback_inputs=inputs)
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, run.guidance_rescale, run.clip_skip
        self._cross_attention_kwargs, self._do_cfg, self._interrupt = run.cross_attention_kwargs, do_cfg, False
        self._num_timesteps = 0
        return run

    def _initial_latents(self, latents: torch.Tensor | None, shape: tuple[int, ...], generator: Any,
                         device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise PolyBridgeValueError(f"latents: shape {tuple(latents.shape)}, but this call needs {shape} "
                                       "(images x latent channels x height / 8 x width / 8)")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------ IP-Adapter (diffusers' own image encoding)

    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds

    # ------------------------------------------------------------------ ControlNet

    @staticmethod
    def _fitting_controlnet(controlnet: Any, unet: Any) -> Any:
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(list(controlnet))
        cn.check_fits(controlnet, unet)
        return controlnet

    def set_controlnet(self, controlnet: Any) -> None:
        """Use ``controlnet`` (a ``ControlNetModel``, a ``MultiControlNetModel`` or a list; ``None``: none) beside
        the branches. One made for another architecture is refused and the pipeline keeps its ControlNet."""
        if controlnet is not None:
            controlnet = self._fitting_controlnet(controlnet, self.unet)
        self.register_modules(controlnet=controlnet)

    def _prepare_control(self, image: Any, options: dict[str, Any], run: _Run, batch: int, per_prompt: int,
                         size: tuple[int, int], steps: int, device: torch.device) -> cn.ControlSource | None:
        if image is None and self.controlnet is None:
            return None
        if self.controlnet is None:
            raise PolyBridgeValueError("image= is the ControlNet's hint, but this pipeline has no ControlNet; "
                                       "build it with controlnet= or call pipe.set_controlnet(...)")
        if image is None:
            raise PolyBridgeValueError("this pipeline has a ControlNet: give its hint image with image=")
        return cn.ControlSource.prepare(
            self.controlnet, image, batch=batch, per_prompt=per_prompt, height=size[0], width=size[1],
            do_cfg=run.do_cfg, scale=options.get("controlnet_conditioning_scale", 1.0),
            start=options.get("control_guidance_start", 0.0), end=options.get("control_guidance_end", 1.0),
            steps=steps, device=device, dtype=self.controlnet.dtype, vae_scale_factor=self.vae_scale_factor)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        language: str | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        branch_scale: float | None = None,
        english_prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image: Any = None,
        lora_adapters: list[str | None] | None = None,
        **options: Any,
    ) -> PolyBridgePipelineOutput | tuple:
        """Generate images for ``prompt`` (one string or a list: one batch) written in ``language``; with
        ``language=None`` the router decides for each prompt (and splits mixed prompts into spans).

        ``negative_prompt`` is in the same language as the prompt (routed too with ``language=None``);
        ``english_prompt`` is what the backbone's text encoder reads alongside a native prompt (``""``: the branch
        alone carries the meaning; an English text mixes its meaning in, as in BDM; with ``language=None`` it is
        appended to the routed English text). ``branch_scale`` overrides the entry's ``branch.scale``.

        As ``StableDiffusionPipeline``: ``timesteps`` / ``sigmas``, ``latents``, ``prompt_embeds`` /
        ``negative_prompt_embeds`` (the backbone's English side, one per prompt; on SDXL with
        ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds`` in ``options``), and in ``options``: ``eta``,
        ``guidance_rescale``, ``cross_attention_kwargs`` (``{"scale": s}``: the LoRA scale), ``clip_skip``,
        ``callback_on_step_end`` with ``callback_on_step_end_tensor_inputs``. As
        ``StableDiffusionControlNetPipeline``: ``image`` (the hint), and in ``options``:
        ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end``. As with diffusers' IP-Adapter
        (``load_ip_adapter``): ``ip_adapter_image`` / ``ip_adapter_image_embeds`` in ``options``, the image prompt of
        every image of the call. ``lora_adapters``: one LoRA
        adapter name (or ``None``) per prompt, all in one denoising loop (:mod:`polybridge.plugins.lora`).
        """
        options = _check_options(options)
        if prompt is None and prompt_embeds is not None:
            prompt, language = [""] * prompt_embeds.shape[0], language or self.config.backbone_language
        if image is not None and height is None and width is None:
            height, width = cn.hint_size(image)
        prompts, height, width = self._check_call(prompt, num_inference_steps, guidance_scale, branch_scale,
                                                  num_images_per_prompt, output_type, height, width)
        negatives = _broadcast("" if negative_prompt is None else negative_prompt, len(prompts), "negative_prompt")
        englishes = _broadcast(english_prompt, len(prompts), "english_prompt")
        n = num_images_per_prompt
        rows = [row for row in self._rows(prompts, negatives, englishes, language) for _ in range(n)]
        batch = len(rows)
        if isinstance(generator, list) and len(generator) != batch:
            raise PolyBridgeValueError(f"generator: {len(generator)} generators for {batch} images "
                             f"({batch // n} prompts x num_images_per_prompt {n}); give one per image or a single one")
        given = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                 **{k: options.get(k) for k in POOLED_EMBEDS}}
        embeds = {k: _per_image(v, len(prompts), n, k) for k, v in given.items() if v is not None}
        run = self._start_run(guidance_scale, generator, options)
        device = self._execution_device
        timesteps = self._timesteps(num_inference_steps, device, timesteps, sigmas)
        run.control = self._prepare_control(image, options, run, batch, n, (height, width), len(timesteps), device)
        run.image_embeds = ip.call_image_embeds(self, options.get("ip_adapter_image"),
                                                options.get("ip_adapter_image_embeds"), batch, run.do_cfg, device)
        items = self._branch_inputs(rows, run.do_cfg, branch_scale, device)
        base = self._call_conditioning(rows, items, run, height, width, device, embeds)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = self._initial_latents(latents, shape, generator, device, base.context.dtype)
        with row_lora.per_row_adapters(self.unet, lora_adapters, len(prompts), n, run.do_cfg):
            latents = self._denoise(latents, base, items, run, timesteps)
        return self._finish(latents, rows, output_type, generator, return_dict, language)

    def _timesteps(self, steps: int, device: torch.device, timesteps: Any, sigmas: Any) -> torch.Tensor:
        """The scheduler's timesteps: ``steps`` of its own spacing, or the given ``timesteps`` / ``sigmas``."""
        try:
            return retrieve_timesteps(self.scheduler, steps, device, timesteps, sigmas)[0]
        except ValueError as exc:
            raise PolyBridgeValueError(f"timesteps / sigmas: {exc}") from None

    def _finish(self, latents: torch.Tensor, rows: list[_Row], output_type: str, generator: Any, return_dict: bool,
                language: str | None) -> PolyBridgePipelineOutput | tuple:
        if output_type == "latent":
            images: Any = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                      do_denormalize=[True] * decoded.shape[0])
        self.maybe_free_model_hooks()
        labels = [row.label for row in rows]
        if not return_dict:
            return (images, labels)
        return PolyBridgePipelineOutput(images=images, languages=labels,
                                        plans=None if language is not None else [row.plan for row in rows])


#: Keyword arguments of ``__call__`` beyond its named ones (diffusers' own meanings).
CALL_OPTIONS = ("eta", "guidance_rescale", "cross_attention_kwargs", "clip_skip", "callback_on_step_end",
                "callback_on_step_end_tensor_inputs", "controlnet_conditioning_scale", "control_guidance_start",
                "control_guidance_end", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "ip_adapter_image",
                "ip_adapter_image_embeds")
#: SDXL's pooled text embeddings, given beside ``prompt_embeds`` as to ``StableDiffusionXLPipeline``.
POOLED_EMBEDS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in options if k not in CALL_OPTIONS]
    if unknown:
        raise PolyBridgeTypeError(f"PolyBridgePipeline.__call__ got unexpected keyword argument(s) "
                                  f"{', '.join(map(repr, unknown))}; besides its named ones it takes "
                                  f"{', '.join(CALL_OPTIONS)}")
    return options


def _per_image(embeds: torch.Tensor, prompts: int, n: int, name: str) -> torch.Tensor:
    rank = 2 if "pooled" in name else 3
    if embeds.ndim != rank or embeds.shape[0] != prompts:
        raise PolyBridgeValueError(f"{name}: shape {tuple(embeds.shape)}, expected ({prompts}, "
                                   f"{'width' if rank == 2 else 'tokens, width'}): one per prompt")
    return embeds.repeat_interleave(n, dim=0)
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise PolyBridgeTypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")


def _broadcast(value: Any, n: int, name: str) -> list[str]:
    values = _as_list(value, name)
    if isinstance(value, str):
        return values * n
    if len(values) != n:
        raise PolyBridgeValueError(f"{name}: {len(values)} entries for {n} prompts; give one string or one per prompt")
    return values
