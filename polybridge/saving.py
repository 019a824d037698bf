"""Whole-pipeline save and load: ``PolyBridgePipeline.save_pretrained(dir)`` writes a self-contained registry.

The folder is a registry like the project's own, every source local, so ``from_pretrained(dir)`` (which is
``from_registry(dir)``) rebuilds the same pipeline offline and draws the same images::

    dir/registry.yaml                      the backbone (./model), the languages, the backbone language
    dir/model/                             the backbone in diffusers format (its family's diffusers pipeline)
    dir/languages/<code>/language.yaml     each language's entry, sources pointing at the files beside it
    dir/languages/<code>/{encoder,tokenizer,branch}/

A language that came from a registry keeps its entry (and the files of its folder: grammar, word lists, prompt
sets); one added in code gets a minimal entry (scripts from the pipeline's router when it has one). The folder is
written atomically (polybridge.atomic).
"""

from __future__ import annotations

import inspect
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

from polybridge import catalog
from polybridge.atomic import atomic_dir
from polybridge.errors import PolyBridgeValueError
from polybridge.registry import LANGUAGE_FILE

WEIGHT_FOLDERS = ("encoder", "tokenizer", "branch")


def save_pipeline(pipe: Any, target: str | Path, overwrite: bool = False) -> Path:
    """Write ``pipe`` to ``target`` (see the module doc); returns the registry file."""
    if any(pipe.get_list_adapters().values()):
        raise PolyBridgeValueError("save_pretrained: LoRA adapters are loaded; bake them in with pipe.fuse_lora() "
                                   "and pipe.unload_lora_weights(), or remove them with pipe.unload_lora_weights()")
    with atomic_dir(target, overwrite=overwrite) as tmp:
        save_backbone(pipe, tmp / "model")
        codes = [pipe.config.backbone_language]
        for code, loaded in pipe.languages.items():
            if code != pipe.config.backbone_language and _save_language(pipe, code, loaded, tmp):
                codes.append(code)
        if not (tmp / "languages" / codes[0]).exists():
            _write_entry(tmp / "languages" / codes[0], _backbone_entry(pipe, codes[0]))
        _write_registry(pipe, tmp, codes)
    return Path(target) / "registry.yaml"


def save_backbone(pipe: Any, folder: Path) -> None:
    """The backbone's components, saved by the family's diffusers pipeline (a folder it loads as it is)."""
    import diffusers

    cls = getattr(diffusers, pipe.family.diffusers_pipeline)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {name: getattr(pipe, name) for name in pipe.family.component_names()}
    for name, param in params.items():
        if name not in kwargs and name != "self" and param.default is inspect.Parameter.empty:
            kwargs[name] = None  # safety_checker, feature_extractor: not part of a polybridge backbone
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    cls(**kwargs).save_pretrained(folder, safe_serialization=True)


def _architecture(pipe: Any) -> str:
    if pipe.registry is not None:
        for spec in pipe.registry.backbones.values():
            if catalog.family_of_architecture(spec.architecture) == pipe.family.name:
                return spec.architecture
    return next(a for a, family in catalog.ARCHITECTURES.items() if family == pipe.family.name)


def _write_registry(pipe: Any, root: Path, codes: list[str]) -> None:
    name = "backbone"
    if pipe.registry is not None:
        name = pipe.registry.default_backbone
    top = {"version": 1,
           "backbones": {name: {"source": "./model", "architecture": _architecture(pipe),
                                "language": pipe.config.backbone_language}},
           "default_backbone": name, "fallback_language": pipe.config.backbone_language, "languages": codes}
    (root / "registry.yaml").write_text(yaml.safe_dump(top, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _registry_entry(pipe: Any, code: str) -> Any:
    if pipe.registry is None or code not in pipe.registry.codes:
        return None
    return pipe.registry.language(code)


def _save_language(pipe: Any, code: str, loaded: Any, root: Path) -> bool:
    folder = root / "languages" / code
    entry = _registry_entry(pipe, code)
    if entry is not None:
        shutil.copytree(entry.folder, folder, ignore=shutil.ignore_patterns(*WEIGHT_FOLDERS))
        data = yaml.safe_load(entry.file.read_text(encoding="utf-8"))
    elif loaded.route == "backbone":
        warnings.warn(f"save_pretrained: language {code!r} goes to the backbone's text encoder and has no registry "
                      "entry to keep; it is not saved", stacklevel=3)
        return False
    else:
        data = {"code": code, "name": code, "scripts": _scripts(pipe, code), "fallback": "zero-branch"}
    if loaded.route == "branch":
        encoder, branch = pipe.encoders[code], pipe.branches[code]
        encoder.model.save_pretrained(folder / "encoder", safe_serialization=True)
        encoder.tokenizer.save_pretrained(folder / "tokenizer")
        branch.save_pretrained(folder / "branch")
        enc = dict(data.get("encoder") or {})
        enc.update(source="./encoder", tokenizer="./tokenizer", model_class=type(encoder.model).__name__,
                   max_length=encoder.max_length, hidden_layer=encoder.hidden_layer)
        enc.pop("revision", None)
        data["encoder"] = enc
        data["branch"] = {**(data.get("branch") or {}), "type": branch.branch_type, "weights": "./branch",
                          "scale": loaded.scale}
    _write_entry(folder, data)
    return True


def _scripts(pipe: Any, code: str) -> list[str]:
    router = getattr(pipe, "_base_router", None)
    scripts = list(getattr(router, "languages", {}).get(code, ()))
    return scripts or ["Latin"]


def _backbone_entry(pipe: Any, code: str) -> dict[str, Any]:
    return {"code": code, "name": code, "scripts": _scripts(pipe, code), "fallback": "backbone"}


def _write_entry(folder: Path, data: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LANGUAGE_FILE).write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def load_pipeline(cls: type, source: str | Path, **kwargs: Any) -> Any:
    """``cls.from_pretrained``: a folder ``save_pretrained`` wrote (a registry), or a diffusers-format backbone
    (a folder or hub id: its own diffusers pipeline, then ``from_pipe``, no languages)."""
    import diffusers

    path = Path(source)
    if (path / "registry.yaml").is_file():
        return cls.from_registry(path / "registry.yaml", **kwargs)
    config = diffusers.DiffusionPipeline.load_config(str(source), local_files_only=path.is_dir())
    pipeline_cls = getattr(diffusers, str(config.get("_class_name")), None)
    if pipeline_cls is None:
        raise PolyBridgeValueError(f"{source}: neither a saved PolyBridgePipeline (no registry.yaml) nor a diffusers "
                                   f"pipeline folder (model_index.json names {config.get('_class_name')!r})")
    device = kwargs.pop("device", None)
    pipe = cls.from_pipe(pipeline_cls.from_pretrained(str(source), **kwargs))
    return pipe if device is None else pipe.to(device)
