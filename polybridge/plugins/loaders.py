"""diffusers' loader mixins, checked first: a LoRA or Textual Inversion that does not fit the backbone is refused
with a :class:`~polybridge.plugins.PluginError` naming it and what would fit, before anything is changed.

:class:`CheckedLoaders` goes before diffusers' mixins in :class:`~polybridge.pipeline.PolyBridgePipeline`'s bases;
everything else (``set_adapters``, ``fuse_lora``, ``unload_lora_weights``, ...) is diffusers' own. All of it acts on
the backbone's UNet and text encoder(s); branches hold no LoRA layers and no vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from polybridge.plugins import PluginError
from polybridge.plugins import ip_adapter as ip


def _plugin_name(source: Any, adapter_name: str | None = None) -> str:
    if adapter_name:
        return adapter_name
    if isinstance(source, (str, Path)):
        return str(source)
    return "(state dict)"


def lora_mismatches(state_dict: Mapping[str, torch.Tensor], components: Any) -> list[str]:
    """Where a diffusers-format LoRA state dict (``unet.<layer>.lora_A.weight`` ...) does not fit ``components``'
    UNet and text encoder(s): layers it names that are missing, or of another width."""
    problems = []
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        model = getattr(components, prefix, None) if prefix in ("unet", "text_encoder", "text_encoder_2") else None
        for marker, axis in ((".lora_A.", 1), (".lora_B.", 0)):
            if model is None or marker not in rest or not rest.endswith(".weight"):
                continue
            path = rest.split(marker)[0]
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                problems.append(f"{prefix}.{path} does not exist")
                continue
            base = getattr(layer, "base_layer", layer)
            weight = getattr(base, "weight", None)
            want = None if weight is None else weight.shape[axis]  # (out, in, ...): lora_A reads in, lora_B gives out
            if want is not None and value.shape[axis] != want:
                problems.append(f"{prefix}.{path} is {want} wide in the backbone, {value.shape[axis]} in the LoRA")
    return list(dict.fromkeys(problems))


class CheckedLoaders:
    """``load_lora_weights`` and ``load_textual_inversion`` that refuse what does not fit, pipeline unchanged."""

    def _fits_hint(self) -> str:
        from polybridge.backbones import architecture_fingerprint

        return (f"one trained for this backbone's architecture fits ({self.family.name} family, fingerprint "
                f"{architecture_fingerprint(self.unet)})")

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None,
                          **kwargs: Any) -> None:
        name = _plugin_name(pretrained_model_name_or_path_or_dict, adapter_name)
        source = pretrained_model_name_or_path_or_dict
        try:
            state = self.lora_state_dict(dict(source) if isinstance(source, Mapping) else source,
                                         unet_config=self.unet.config, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise PluginError(f"LoRA {name!r}: cannot be read: {str(exc).splitlines()[0]}") from None
        state_dict = state[0] if isinstance(state, tuple) else state
        problems = lora_mismatches(state_dict, self)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise PluginError(f"LoRA {name!r} is for another architecture: {'; '.join(problems[:3])}{more}; "
                              f"{self._fits_hint()}")
        if adapter_name is not None and adapter_name in self._loaded_adapters():
            raise PluginError(f"LoRA {name!r}: an adapter of that name is loaded already; loaded: "
                              f"{', '.join(self._loaded_adapters())}; give another adapter_name")
        self._family_lora_loader().load_lora_weights(self, state_dict, adapter_name=adapter_name, **kwargs)

    def _family_lora_loader(self) -> type:
        """diffusers' LoRA loader of the backbone family's pipeline (SDXL's also loads into ``text_encoder_2``)."""
        from diffusers.loaders import (
            StableDiffusionLoraLoaderMixin,
            StableDiffusionXLLoraLoaderMixin,
        )

        return StableDiffusionXLLoraLoaderMixin if self.family.name == "sdxl" else StableDiffusionLoraLoaderMixin

    @property
    def _lora_loadable_modules(self) -> list[str]:
        """What ``set_adapters``, ``fuse_lora``, ``unload_lora_weights`` act on: the UNet and the family's text
        encoders (never a branch)."""
        return ["unet", *(name for name, _ in self.family.text_encoders)]

    def _loaded_adapters(self) -> list[str]:
        return sorted({a for names in self.get_list_adapters().values() for a in names})

    def load_textual_inversion(self, pretrained_model_name_or_path: Any, token: Any = None, tokenizer: Any = None,
                               text_encoder: Any = None, **kwargs: Any) -> None:
        name = token if isinstance(token, str) else _plugin_name(pretrained_model_name_or_path)
        encoder = text_encoder or self.text_encoder
        try:  # diffusers checks everything before it changes the tokenizer or the encoder
            super().load_textual_inversion(pretrained_model_name_or_path, token=token, tokenizer=tokenizer,
                                           text_encoder=text_encoder, **kwargs)
        except ValueError as exc:
            message = str(exc).splitlines()[0].strip()
            if "incorrect shape" in message:
                message = (f"its embeddings are not {encoder.get_input_embeddings().weight.shape[-1]} wide, the "
                           "width of the backbone's text encoder, so it is for another architecture")
            raise PluginError(f"Textual Inversion {name!r}: {message}; {self._fits_hint()}") from None

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict: Any, subfolder: Any = "",
                        weight_name: Any = ip.WEIGHT_NAME, image_encoder_folder: str | None = "image_encoder",
                        **kwargs: Any) -> None:
        """diffusers' ``load_ip_adapter``, the weights checked against the backbone UNet first (a local folder or
        a state dict); if loading fails half-way, the pipeline is put back as it was."""
        sources = pretrained_model_name_or_path_or_dict
        names = weight_name if isinstance(weight_name, list) else [weight_name]
        sources = sources if isinstance(sources, list) else [sources] * len(names)
        subfolders = subfolder if isinstance(subfolder, list) else [subfolder] * len(names)
        for source, sub, name in zip(sources, subfolders, names, strict=False):
            state = source if isinstance(source, Mapping) else ip.read_local(source, sub, name)
            if state is None:
                continue  # a hub id: diffusers reads (and checks) it
            problems = ip.ip_adapter_mismatches(dict(state), self.unet)
            if problems:
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                raise PluginError(f"IP-Adapter {_plugin_name(source)} is for another architecture: "
                                  f"{'; '.join(problems[:3])}{more}; {self._fits_hint()}")
            if not isinstance(source, Mapping) and image_encoder_folder and self.image_encoder is None:
                folder = ip.image_encoder_dir(source, sub, image_encoder_folder)
                if not (folder / "config.json").is_file():
                    raise PluginError(f"IP-Adapter {source}: no image encoder at {folder} (a CLIPVisionModelWithProjection "
                                      "folder); give image_encoder_folder=, or load the pipeline's image_encoder first")
        before = (self.image_encoder, self.feature_extractor, dict(self.unet.attn_processors),
                  getattr(self.unet, "encoder_hid_proj", None), getattr(self.unet.config, "encoder_hid_dim_type", None))
        try:
            super().load_ip_adapter(pretrained_model_name_or_path_or_dict, subfolder=subfolder,
                                    weight_name=weight_name, image_encoder_folder=image_encoder_folder, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            encoder, extractor, processors, hid_proj, hid_type = before
            self.register_modules(image_encoder=encoder, feature_extractor=extractor)
            self.unet.set_attn_processor(processors)
            self.unet.encoder_hid_proj = hid_proj
            self.unet.config.encoder_hid_dim_type = hid_type
            raise PluginError(f"IP-Adapter {_plugin_name(sources[0])}: cannot be loaded: "
                              f"{str(exc).splitlines()[0]}") from None
