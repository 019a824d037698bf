"""Plugins made for the backbone, used beside the branches (stock diffusers formats):

- :mod:`~polybridge.plugins.controlnet`: a ControlNet (or several) as one more source of
  :class:`~polybridge.conditioning.Conditioning` (residuals), composed with the branches' by ``compose()``;
- :mod:`~polybridge.plugins.lora`: LoRA adapters per row of a batch (peft's mixed-batch ``adapter_names``);
- :mod:`~polybridge.plugins.checkpoint`: another checkpoint of the backbone's architecture, branches kept;
- :mod:`~polybridge.plugins.ip_adapter`: an IP-Adapter's image prompt beside any language's text;
- :mod:`~polybridge.plugins.loaders`: LoRA, Textual Inversion and IP-Adapter loading, checked before anything changes.

Loading (``load_lora_weights``, ``load_textual_inversion``, ``load_ip_adapter``, ...) is diffusers' own loader
mixins on :class:`~polybridge.pipeline.PolyBridgePipeline`; they act on the backbone only. The registry's
``plugins:`` section names plugins as data (:mod:`polybridge.plugins.use`).
"""

from polybridge.errors import PolyBridgeError


class PluginError(PolyBridgeError, ValueError):
    """A plugin that does not fit the backbone (or is unknown); the message names it and what would fit."""


__all__ = ["PluginError"]
