"""Plugins as data: the registry's ``plugins:`` section, applied to a pipeline by name.

``registry.yaml``::

    plugins:
      watercolor: {kind: lora, source: ./plugins/watercolor, backbone: tiny, scale: 0.8}
      edges:      {kind: controlnet, source: ./plugins/edges}
      toy:        {kind: textual_inversion, source: ./plugins/toy.safetensors, token: "<toy>"}
      tiny-ft:    {kind: checkpoint, source: ./plugins/tiny-ft, variant: fp16}
      look:       {kind: ip_adapter, source: ./plugins/look, scale: 0.6}   # ip-adapter.safetensors + image_encoder/

Each plugin names the backbone it was made for (default: ``default_backbone``); one for a backbone of another
family is refused before anything is loaded, and the loaders check the weights themselves (a LoRA or a ControlNet
for another architecture, a Textual Inversion of another width).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from polybridge import catalog
from polybridge.plugins import PluginError
from polybridge.plugins import ip_adapter as ip


def parse_lora(text: str) -> tuple[str, float | None]:
    """``NAME[:SCALE]`` (the CLI's ``--lora``)."""
    name, sep, scale = text.rpartition(":") if ":" in text else (text, "", "")
    if not sep:
        return text, None
    try:
        return name, float(scale)
    except ValueError:
        raise PluginError(f"--lora {text!r}: SCALE must be a number (NAME or NAME:SCALE, e.g. watercolor:0.8)") from None


def _fits(registry: Any, backbone: str, pipe: Any) -> bool:
    """Whether registry backbone ``backbone`` is the architecture ``pipe`` runs: the one it was built on, or one
    whose UNet config (read when it is a local folder) has the pipeline's fingerprint; else its family's."""
    from polybridge.backbones import architecture_fingerprint

    if backbone == getattr(pipe, "backbone_name", None):
        return True
    source = registry.backbone_source(backbone)
    config = None if isinstance(source, str) else source / "unet" / "config.json"
    if config is not None and config.is_file():
        theirs = json.loads(config.read_text(encoding="utf-8"))
        return architecture_fingerprint(theirs) == architecture_fingerprint(pipe.unet)
    return catalog.family_of_architecture(registry.backbone(backbone).architecture) == pipe.family.name


def _spec(registry: Any, name: str, kind: str, pipe: Any) -> Any:
    spec = registry.plugin(name, kind)
    if not _fits(registry, spec.backbone, pipe):
        fits = [n for n, p in registry.plugins.items() if p.kind == kind and _fits(registry, p.backbone, pipe)]
        raise PluginError(f"{kind} plugin {name!r} is for backbone {spec.backbone!r} "
                          f"({registry.backbone(spec.backbone).architecture}), another architecture than this "
                          f"pipeline's {getattr(pipe, 'backbone_name', None) or pipe.family.name!r}; {kind} plugins "
                          f"that fit: {', '.join(fits) or '(none listed)'}")
    return spec


def _source(registry: Any, spec: Any) -> str:
    return str(registry.plugin_source(spec.name))


def use_plugins(pipe: Any, registry: Any, *, loras: Sequence[str] = (), controlnets: Sequence[str] = (),
                tis: Sequence[str] = (), checkpoint: str | None = None, ip_adapter: str | None = None) -> None:
    """Load the named plugins into ``pipe``: a checkpoint first, then Textual Inversions, LoRAs (``NAME[:SCALE]``,
    all active with their scales), ControlNets (several: a MultiControlNet, hints in that order) and an IP-Adapter
    (at its registry scale; a call then takes ``ip_adapter_image=``)."""
    specs = [_spec(registry, checkpoint, "checkpoint", pipe)] if checkpoint else []
    specs += [_spec(registry, n, "textual_inversion", pipe) for n in tis]
    lora_scales = [parse_lora(text) for text in loras]
    specs += [_spec(registry, n, "lora", pipe) for n, _ in lora_scales]
    specs += [_spec(registry, n, "controlnet", pipe) for n in controlnets]  # every name checked before loading
    specs += [_spec(registry, ip_adapter, "ip_adapter", pipe)] if ip_adapter else []
    before = _snapshot(pipe)
    try:
        _load(pipe, registry, checkpoint, tis, lora_scales, controlnets, ip_adapter)
    except BaseException:
        _restore(pipe, before)
        raise


def _snapshot(pipe: Any) -> dict[str, Any]:
    names = [*pipe.family.component_names(), "controlnet", "image_encoder", "feature_extractor"]
    return {"components": {n: getattr(pipe, n) for n in names}, "vocab": set(pipe.tokenizer.get_vocab()),
            "adapters": {a for names in pipe.get_list_adapters().values() for a in names}}


def _restore(pipe: Any, before: dict[str, Any]) -> None:
    """Undo a failed :func:`use_plugins`: the backbone's components as they were, new adapters and tokens gone."""
    if pipe.unet is before["components"]["unet"]:
        added = {a for names in pipe.get_list_adapters().values() for a in names} - before["adapters"]
        if added:
            pipe.delete_adapters(sorted(added))
        tokens = sorted(set(pipe.tokenizer.get_vocab()) - before["vocab"])
        if tokens:
            pipe.unload_textual_inversion(tokens)
        if before["components"]["image_encoder"] is None and pipe.image_encoder is not None:
            pipe.unload_ip_adapter()
    pipe.register_modules(**before["components"])


def _load(pipe: Any, registry: Any, checkpoint: str | None, tis: Sequence[str],
          lora_scales: list[tuple[str, float | None]], controlnets: Sequence[str], ip_adapter: str | None) -> None:
    if checkpoint:
        spec = registry.plugin(checkpoint, "checkpoint")
        pipe.swap_backbone(_source(registry, spec), variant=spec.variant, config=registry.backbone_source(spec.backbone))
    for name in tis:
        spec = registry.plugin(name)
        pipe.load_textual_inversion(_source(registry, spec), token=spec.token,
                                    **({"weight_name": spec.weight_name} if spec.weight_name else {}))
    for name, _ in lora_scales:
        spec = registry.plugin(name)
        pipe.load_lora_weights(_source(registry, spec), adapter_name=name,
                               **({"weight_name": spec.weight_name} if spec.weight_name else {}))
    if lora_scales:
        pipe.set_adapters([n for n, _ in lora_scales],
                          adapter_weights=[registry.plugin(n).scale if s is None else s for n, s in lora_scales])
    if controlnets:
        nets = [load_controlnet(_source(registry, registry.plugin(n)), n, pipe.unet) for n in controlnets]
        pipe.set_controlnet(nets if len(nets) > 1 else nets[0])
    if ip_adapter:
        spec = registry.plugin(ip_adapter)
        pipe.load_ip_adapter(_source(registry, spec), subfolder="", weight_name=spec.weight_name or ip.WEIGHT_NAME)
        pipe.set_ip_adapter_scale(spec.scale)


def load_controlnet(source: str | Path, name: str, unet: Any = None) -> Any:
    """A ``ControlNetModel`` from a diffusers folder or hub id (safetensors only); refused unless it fits ``unet``."""
    from diffusers import ControlNetModel

    from polybridge.plugins.controlnet import check_fits

    try:
        net = ControlNetModel.from_pretrained(str(source), use_safetensors=True,
                                              local_files_only=Path(source).exists()).eval()
    except (OSError, ValueError) as exc:
        raise PluginError(f"ControlNet plugin {name!r}: cannot load {source}: {str(exc).splitlines()[0]}") from None
    if unet is not None:
        check_fits(net, unet, name)
    return net


def check_plugin(registry: Any, name: str) -> str:
    """``polybridge registry validate``: ``ok``, ``hub`` (not checked offline), ``unchecked`` (its backbone's folder
    is missing, so its architecture cannot be compared), or a PluginError naming what is
    wrong. Reads only configs and safetensors headers: the source exists in its kind's format, and a ControlNet's or a
    checkpoint's UNet config is the architecture of the backbone it names (when that backbone is a local folder)."""
    import json

    spec = registry.plugin(name)
    source = registry.plugin_source(name)
    if isinstance(source, str):
        return "hub"
    where = f"{spec.kind} plugin {name!r} ({registry.file}, key plugins.{name}.source)"
    if not source.exists():
        raise PluginError(f"{where}: {source} does not exist")
    files = [source] if source.is_file() else sorted(source.rglob("*.safetensors"))
    if spec.weight_name or spec.kind == "ip_adapter":
        files = [source / (spec.weight_name or ip.WEIGHT_NAME)]
    if spec.kind == "ip_adapter" and not (source / "image_encoder" / "config.json").is_file():
        raise PluginError(f"{where}: no image encoder at {source / 'image_encoder'} (an IP-Adapter folder holds "
                          "its weights and a CLIPVisionModelWithProjection folder image_encoder/)")
    if not files or not all(f.is_file() and f.suffix == ".safetensors" for f in files):
        raise PluginError(f"{where}: no .safetensors weights at {source}"
                          + (f" (weight_name {spec.weight_name!r})" if spec.weight_name else ""))
    config = {"controlnet": source / "config.json", "checkpoint": source / "unet" / "config.json"}.get(spec.kind)
    backbone = registry.backbone_source(spec.backbone)
    if config is None or source.is_file() or isinstance(backbone, str):
        return "ok"
    if not (backbone / "unet" / "config.json").is_file():  # the backbone is not built here: nothing to compare
        return "unchecked"
    if not config.is_file():
        raise PluginError(f"{where}: {config} is missing; a diffusers-format {spec.kind} has it")
    from polybridge.backbones import architecture_diff, architecture_fingerprint

    theirs = json.loads(config.read_text(encoding="utf-8"))
    ours = json.loads((backbone / "unet" / "config.json").read_text(encoding="utf-8"))
    keys = ("cross_attention_dim", "block_out_channels", "in_channels") if spec.kind == "controlnet" else None
    diff = ({k: (ours.get(k), theirs.get(k)) for k in keys if ours.get(k) != theirs.get(k)} if keys else
            architecture_diff(ours, theirs) if architecture_fingerprint(ours) != architecture_fingerprint(theirs) else {})
    if diff:
        detail = "; ".join(f"{k}: {b!r} (backbone {spec.backbone!r}: {a!r})" for k, (a, b) in list(diff.items())[:4])
        raise PluginError(f"{where}: not for backbone {spec.backbone!r}'s architecture: {detail}")
    return "ok"


#: The plugin kinds a server applies per request (a ControlNet needs a hint image, an IP-Adapter an image prompt,
#: a checkpoint is a backbone).
SERVED_KINDS = ("lora", "textual_inversion")


def load_served_plugins(pipe: Any, registry: Any, names: Sequence[str] | None = None) -> dict[str, str]:
    """Load every LoRA and Textual Inversion plugin of ``registry`` that fits ``pipe`` (or those in ``names``) so
    that requests can choose them row by row; returns ``{name: why}`` for each plugin not loaded.

    Every LoRA stays loaded and active with its registry scale; a call picks each row's adapter with
    ``lora_adapters=`` (:mod:`polybridge.plugins.lora`). A LoRA that also adapts a text encoder is not served: the
    rows of one call share the text encoder, so its text side would reach every row."""
    from polybridge.plugins.lora import adapter_names_of, lora_layers

    unknown = sorted(set(names or ()) - set(registry.plugins))
    if unknown:
        raise PluginError(f"plugins {', '.join(map(repr, unknown))} are not in {registry.file}; its plugins: "
                          f"{', '.join(registry.plugins) or '(none)'}")
    skipped = {}
    for name, spec in registry.plugins.items():
        if names is not None and name not in names:
            continue
        if spec.kind not in SERVED_KINDS:
            article = "an" if spec.kind[0] in "aeiou" else "a"
            skipped[name] = (f"{article} {spec.kind} plugin: the server applies {' and '.join(SERVED_KINDS)} "
                             "plugins per request; `polybridge generate` applies this one")
            continue
        try:
            use_plugins(pipe, registry, **({"loras": [name]} if spec.kind == "lora" else {"tis": [name]}))
        except PluginError as exc:
            skipped[name] = str(exc)
            continue
        encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
        if spec.kind == "lora" and any(name in layer.lora_A for m in encoders if m is not None
                                       for layer in lora_layers(m)):
            pipe.delete_adapters([name])
            skipped[name] = ("adapts the text encoder too; the rows of one call share the text encoder, so the "
                             "server serves UNet-only LoRAs")
    loaded = adapter_names_of(pipe.unet)
    if loaded:
        pipe.set_adapters(loaded, adapter_weights=[registry.plugin(n).scale for n in loaded])
    return skipped


@contextmanager
def plugins_applied(pipe: Any, registry: Any, **names: Any) -> Iterator[Any]:
    """:func:`use_plugins` for a ``with`` block: inside it the named plugins are on ``pipe``; after it the pipeline is
    as it was (its components back, the adapters and tokens it added gone), so plugins can be tried one at a time."""
    before = _snapshot(pipe)
    use_plugins(pipe, registry, **names)  # a failure leaves the pipeline as it was
    try:
        yield pipe
    finally:
        _restore(pipe, before)
