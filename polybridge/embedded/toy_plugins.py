"""Toy plugins for the embedded backbone: what the plugin benchmark applies, built as community plugins are.

Each is trained on the English side only (the backbone's own text encoder and English captions of rendered scenes;
no branch, no native text), saved in its ecosystem's own format and loaded by the stock loaders
(:mod:`polybridge.plugins`):

- ``outline-lora``: a style LoRA (peft, diffusers' ``pytorch_lora_weights.safetensors``) with the English trigger
  ``outline style``: objects drawn as outlines.
- ``layout-controlnet``: a ``ControlNetModel`` folder reading a box layout map
  (:func:`~polybridge.synthetic.render.render_hint` ``kind="box"``): objects where the boxes are, as big as them.
- ``kite-ti``: a Textual Inversion embedding (diffusers' one-key safetensors) for ``<kite>``, the object no
  language's captions name.
- ``navy-checkpoint``: a fine-tune of the whole backbone (a diffusers folder) that draws every background navy.

:data:`TOY_PLUGINS` is what a plugin is (the benchmark reads it); ``scripts/build_toy_plugins.py`` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Where the committed toy plugins live (``registry.yaml``'s ``plugins:`` points here).
TOY_PLUGIN_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "plugins"


@dataclass(frozen=True)
class ToyPlugin:
    """One toy plugin: how a user applies it and what it changes in the world."""

    name: str  # its name in registry.yaml's plugins
    kind: str  # lora | controlnet | textual_inversion | checkpoint
    words: str  # the English words a user adds for it (a trigger, a token); "" for none
    effect: str  # what the plugin scorer reads as its effect: style | layout | unnamed | background
    target: str  # the style, hint kind, unnamed object or background it draws


TOY_PLUGINS: tuple[ToyPlugin, ...] = (
    ToyPlugin("outline-lora", "lora", "outline style", "style", "outline"),
    ToyPlugin("layout-controlnet", "controlnet", "", "layout", "box"),
    ToyPlugin("kite-ti", "textual_inversion", "<kite>", "unnamed", "kite"),
    ToyPlugin("navy-checkpoint", "checkpoint", "", "background", "navy"),
)


def toy_plugin(name: str) -> ToyPlugin:
    for plugin in TOY_PLUGINS:
        if plugin.name == name:
            return plugin
    from polybridge.errors import PolyBridgeValueError

    raise PolyBridgeValueError(f"no toy plugin {name!r}; toy plugins: {', '.join(p.name for p in TOY_PLUGINS)}")
