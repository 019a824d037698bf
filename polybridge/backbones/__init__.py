"""Backbone families: one module each behind one interface (:class:`BackboneFamily`), listed in
:mod:`polybridge.catalog` and named by a registry backbone's ``architecture``.

- ``sd`` (:mod:`polybridge.backbones.sd`): Stable Diffusion 1.x / 2.x, the embedded default, SD 1.5;
- ``sdxl`` (:mod:`polybridge.backbones.sdxl`): two text encoders, pooled text and size ids as added conditioning.

A third family (SD3, FLUX) is one new module and one catalog line.
"""

from polybridge.backbones.base import (
    BUILD_HINT,
    FINGERPRINT_KEYS,
    Backbone,
    BackboneError,
    BackboneFamily,
    architecture_config,
    architecture_diff,
    architecture_fingerprint,
    family_of_unet,
    freeze,
    get_family,
    load_backbone,
)

__all__ = ["BUILD_HINT", "FINGERPRINT_KEYS", "Backbone", "BackboneError", "BackboneFamily", "architecture_config",
           "architecture_diff", "architecture_fingerprint", "family_of_unet", "freeze", "get_family", "load_backbone"]
