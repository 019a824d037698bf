"""A branch's training data: where the examples come from, checked at the edge, and the cache of frozen encodings.

The entry's ``data:`` section names the examples:

- ``dataset: synthetic``: this project's world, training split (held-out (object, colour) pairs never appear),
  rendered at the backbone's resolution and captioned by the registry's grammars; ``caption_column`` must be
  ``caption_<code>`` and ``english_column`` (the parallel caption) ``caption_<language>`` of a registered language.
- a local folder: a ``datasets.Dataset`` / ``DatasetDict`` written by ``save_to_disk``, or an image folder with a
  ``metadata.jsonl`` / ``metadata.csv`` (datasets' ``imagefolder``) holding the caption columns;
- a hub id: ``datasets.load_dataset(id, split=data.split)``.

Images must already be RGB at the backbone's resolution; a missing column, an empty dataset, a caption that is not
text, or an image of another size or mode is a :class:`DataError` naming the dataset, the column or row, and what is
expected.

The encoders and the VAE are frozen, so each example's latent, its native token states and (for branch types that
distil) the backbone text encoder's states of its English caption are computed once (:func:`encode_examples`) and
a training step only indexes them. An example without a parallel caption (``None``; in a dataset an empty or
missing cell of ``english_column``) is native-only: its English states are the empty prompt's and ``parallel`` says
so, and a distilling branch type learns it from the denoising loss alone. In the synthetic world a scene's English
caption is a parallel caption only when English names every object in it: for a culture-specific concept it says
"object", which is not a translation, and a teacher fed it cannot draw the concept. Native states of prompts that
need fewer chunks than the longest are filled up with the empty prompt's chunk, exactly as
:meth:`NativeEncoder.encode_with_mask` fills a batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polybridge.conditioning import Conditioning
from polybridge.errors import PolyBridgeError
from polybridge.registry import DATA_OBJECTS, LanguageEntry, Registry, RegistryError
from polybridge.seeding import step_seed

SYNTHETIC = "synthetic"
#: Files that mark a folder written by ``datasets``' ``save_to_disk``.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(PolyBridgeError, ValueError):
    """Training data that cannot be used; the message names the dataset, the column or row, and what is valid."""


@dataclass
class Examples:
    """What a branch trains on: ``n`` examples, each an image (read on demand) and its captions."""

    n: int
    captions: list[str]
    english: list[str | None] | None  # None in the list: no parallel caption (a native-only example)
    read_images: Callable[[Sequence[int]], torch.Tensor] = field(repr=False)
    description: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- sources


def load_examples(registry: Registry, entry: LanguageEntry, *, image_size: int, seed: int,
                  num_samples: int | None = None, need_english: bool = False, objects: str | None = None) -> Examples:
    """The examples of ``entry``'s ``data:`` section (see the module doc). ``need_english``: the branch type
    distils from the English parallel caption, so ``data.english_column`` must name one. ``objects``
    overrides ``data.objects`` (synthetic data only)."""
    if entry.data is None:
        raise RegistryError(entry.file, "data", f"language {entry.code!r} has no 'data:' section, so there is nothing "
                            "to train on; add one (dataset: synthetic, caption_column: caption_<code>)")
    data = entry.data
    n = num_samples if num_samples is not None else data.num_samples
    if n is not None and n < 1:
        raise DataError(f"num_samples must be at least 1, got {n}")
    english_column = data.english_column if need_english else None
    objects = objects or data.objects
    if objects not in DATA_OBJECTS:
        raise DataError(f"objects={objects!r} is not valid; valid: {', '.join(DATA_OBJECTS)}")
    if data.dataset == SYNTHETIC:
        return _synthetic(registry, entry, n or 20000, seed, image_size, english_column, objects)
    if objects != "all":
        raise DataError(f"objects={objects!r} chooses which objects synthetic scenes draw; dataset "
                        f"{data.dataset} ({entry.file}) is not synthetic, so its images are what they are")
    return _from_datasets(entry, n, image_size, english_column)


def _synthetic(registry: Registry, entry: LanguageEntry, n: int, seed: int, size: int,
               english_column: str | None, objects: str) -> Examples:
    from polybridge.synthetic.captions import Captioner
    from polybridge.synthetic.dataset import caption_rng
    from polybridge.synthetic.batches import render_batch
    from polybridge.synthetic.scenes import sample_scenes

    data = entry.data
    assert data is not None and entry.synthetic is not None  # the registry refuses synthetic data without a grammar
    expected = f"caption_{entry.code}"
    if data.caption_column != expected:
        raise RegistryError(entry.file, "data.caption_column", f"synthetic data is captioned in the entry's own "
                            f"language, so the column is {expected!r}, not {data.caption_column!r}", valid=[expected])
    langs = [entry.code]
    english_lang = None
    if english_column is not None:
        english_lang = english_column.removeprefix("caption_")
        valid = [f"caption_{c}" for c, e in registry.languages.items() if e.synthetic is not None and c != entry.code]
        if english_column not in valid:
            raise RegistryError(entry.file, "data.english_column", f"{english_column!r} is not the caption column "
                                "of another registered language with a grammar", valid=valid)
        langs.append(english_lang)
    captioner = Captioner(registry, langs)
    split = data.split
    scene_seed = step_seed(seed, "branch-data", 0)
    # "own": the generic shapes plus the concepts this language names (scenes.sample_scenes' concepts=)
    concepts = tuple(entry.synthetic.concepts) if objects == "own" else None
    scenes = sample_scenes(n, scene_seed, split, concepts=concepts)
    captions = [captioner(s, entry.code, caption_rng(scene_seed, split, i, entry.code)) for i, s in enumerate(scenes)]
    english: list[str | None] | None = None
    if english_lang is not None:
        grammar = captioner.grammars[english_lang]
        # A caption that calls a concept "object" does not translate the scene: native-only (see the module doc).
        english = [captioner(s, english_lang, caption_rng(scene_seed, split, i, english_lang))
                   if all(grammar.noun_key(o.shape) == o.shape for o in s.objects) else None
                   for i, s in enumerate(scenes)]

    def read(indices: Sequence[int]) -> torch.Tensor:
        return render_batch([scenes[i] for i in indices], size)

    return Examples(n=n, captions=captions, english=english, read_images=read,
                    description={"dataset": SYNTHETIC, "split": split, "seed": scene_seed, "n": n, "size": size,
                                 "objects": objects, "concepts": list(concepts) if concepts is not None else None,
                                 "caption_column": data.caption_column, "english_column": english_column,
                                 **_native_only(english)})


def _native_only(english: Sequence[str | None] | None) -> dict[str, int]:
    """The description's count of examples without a parallel caption (when there is an English column)."""
    return {} if english is None else {"native_only": sum(e is None for e in english)}


def open_dataset(entry: LanguageEntry) -> Any:
    """The ``datasets.Dataset`` named by ``entry.data`` (a saved dataset, an image folder or a hub id)."""
    import datasets

    data = entry.data
    assert data is not None
    source = entry.resolve(data.dataset)
    where = f"{entry.file}, key data.dataset"
    if isinstance(source, Path):
        if not source.exists():
            raise DataError(f"dataset {source} does not exist ({where})")
        if not source.is_dir():
            raise DataError(f"dataset {source} is a file; give a folder written by Dataset.save_to_disk or an image "
                            f"folder with metadata.jsonl ({where})")
        if any((source / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            ds = datasets.load_from_disk(str(source))
        else:
            try:
                ds = datasets.load_dataset("imagefolder", data_dir=str(source), split=data.split)
            except (ValueError, FileNotFoundError) as exc:
                raise DataError(f"dataset {source}: not readable as an image folder ({exc}) ({where})") from None
    else:
        ds = datasets.load_dataset(source, split=data.split)
    if isinstance(ds, datasets.DatasetDict):
        if data.split not in ds:
            raise DataError(f"dataset {source} has no split {data.split!r} ({entry.file}, key data.split); "
                            f"valid: {', '.join(ds)}")
        ds = ds[data.split]
    return ds


def _from_datasets(entry: LanguageEntry, n: int | None, size: int, english_column: str | None) -> Examples:
    data = entry.data
    assert data is not None
    ds = open_dataset(entry)
    return examples_from_dataset(ds, caption_column=data.caption_column, image_column=data.image_column,
                                 english_column=english_column, num_samples=n, image_size=size,
                                 name=f"dataset {data.dataset} ({entry.file})")


def examples_from_dataset(ds: Any, *, caption_column: str, image_column: str = "image",
                          english_column: str | None = None, num_samples: int | None = None, image_size: int,
                          name: str = "dataset") -> Examples:
    """Examples from a ``datasets.Dataset``, checked: columns present, not empty, captions are text, images RGB
    at ``image_size`` (the first row now, every row when it is read)."""
    columns = list(ds.column_names)
    for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column),
                        ("data.english_column", english_column)):
        if column is not None and column not in columns:
            raise DataError(f"{name}: {key}: no column {column!r}; its columns are {', '.join(columns) or '(none)'}")
    if len(ds) == 0:
        raise DataError(f"{name}: the dataset is empty (0 rows); give it image/caption rows")
    if num_samples is not None and num_samples < len(ds):
        ds = ds.select(range(num_samples))
    captions = _texts(ds[caption_column], name, caption_column)
    english = [e or None for e in _texts(ds[english_column], name, english_column, missing_ok=True)] \
        if english_column else None
    images = ds.select_columns([image_column])

    def read(indices: Sequence[int]) -> torch.Tensor:
        rows = images[list(indices)][image_column]
        return torch.stack([_pixels(im, int(i), name, image_column, image_size) for im, i in zip(rows, indices)])

    read([0])  # a wrong size or mode fails now, before anything is loaded
    return Examples(n=len(ds), captions=captions, english=english, read_images=read,
                    description={"dataset": name, "n": len(ds), "size": image_size, "caption_column": caption_column,
                                 "english_column": english_column, "fingerprint": getattr(ds, "_fingerprint", None),
                                 **_native_only(english)})


def _texts(values: Sequence[Any], name: str, column: str, missing_ok: bool = False) -> list[Any]:
    """The column's values, checked to be text (``missing_ok``: or None, kept as None)."""
    for i, value in enumerate(values):
        if not isinstance(value, str) and not (missing_ok and value is None):
            raise DataError(f"{name}: row {i}: column {column!r} holds {type(value).__name__} {value!r}, not text")
    return list(values)


def _pixels(image: Any, row: int, name: str, column: str, size: int) -> torch.Tensor:
    import PIL.Image

    if not isinstance(image, PIL.Image.Image):
        raise DataError(f"{name}: row {row}: column {column!r} holds {type(image).__name__}, not an image "
                        "(use a datasets.Image() feature)")
    if image.mode != "RGB" or image.size != (size, size):
        raise DataError(f"{name}: row {row}: image is {image.size[0]}x{image.size[1]} {image.mode}; this backbone "
                        f"takes {size}x{size} RGB images (convert and resize the dataset first)")
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


# --------------------------------------------------------------------------- frozen encodings


@dataclass
class EncodedExamples:
    """Every example's frozen encodings (on CPU), plus the two constant ones for dropped captions."""

    latents: torch.Tensor             # (n, C, h, w): the VAE latent mean times its scaling factor
    states: torch.Tensor              # (n, max_chunks * chunk_length, native width)
    chunks: torch.Tensor              # (n,): chunks each caption really uses (the rest are "" filler)
    empty_states: torch.Tensor        # (1, chunk_length, native width): the native encoder's ""
    empty_context: torch.Tensor       # (1, L, backbone width): the backbone text encoder's ""
    english: torch.Tensor | None = None  # (n, L, backbone width): the English parallel captions
    parallel: torch.Tensor | None = None  # (n,) uint8: 1 where the example has a parallel caption (with english)
    # The backbone's added conditioning of "" and of the English captions (SDXL: the pooled text, "text_embeds"):
    # key -> (1, ...) and key -> (n, ...); empty on families without one.
    empty_added: dict[str, torch.Tensor] = field(default_factory=dict)
    english_added: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def chunk_length(self) -> int:
        return self.empty_states.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"latents": self.latents, "states": self.states, "chunks": self.chunks,
               "empty_states": self.empty_states, "empty_context": self.empty_context}
        out.update({k: v for k, v in (("english", self.english), ("parallel", self.parallel)) if v is not None})
        for group in _ADDED_GROUPS:
            out.update({f"{group}.{k}": v for k, v in getattr(self, group).items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> EncodedExamples:
        added = {group: {k.removeprefix(f"{group}."): v for k, v in tensors.items() if k.startswith(f"{group}.")}
                 for group in _ADDED_GROUPS}
        return cls(**{k: tensors.get(k) for k in ("latents", "states", "chunks", "empty_states", "empty_context",
                                                  "english", "parallel")}, **added)


#: The EncodedExamples fields of added conditioning, stored as "<field>.<key>" tensors.
_ADDED_GROUPS = ("empty_added", "english_added")


def encode_backbone_text(backbone: Any, texts: Sequence[str], device: Any) -> Conditioning:
    """The backbone's conditioning of ``texts`` as its family encodes a prompt (``backbone``: a
    :class:`~polybridge.backbones.Backbone`)."""
    from polybridge.backbones import get_family

    return get_family(backbone.family).encode_prompt(backbone, list(texts), device)


def chunk_counts(encoder: Any, captions: Sequence[str]) -> list[int]:
    return [len(encoder.chunk_ids(c)) for c in captions]


@torch.no_grad()
def encode_examples(examples: Examples, indices: Sequence[int], *, vae: Any, encoder: Any, backbone: Any,
                    max_chunks: int, english: bool, device: Any, dtype: torch.dtype,
                    batch_size: int = 256, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Latents, native states (filled up to ``max_chunks``) and, with ``english``, the backbone's conditioning of the
    English captions (``english``, and ``english_added.<key>`` on families with added conditioning), for the
    examples at ``indices`` (tensors on CPU in ``dtype``; chunk counts as int64).
    With ``vae=None`` the images are not read and no latents are returned (they come from a shared cache)."""
    filler = encoder.encode([""]).to(device=device, dtype=dtype)
    out: dict[str, list[torch.Tensor]] = {"latents": [], "states": [], "chunks": [], "english": [], "parallel": []}
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        if vae is not None:
            pixels = examples.read_images(idx).to(device=device, dtype=vae.dtype)
            scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = (vae.encode(pixels).latent_dist.mean - shift) * scaling
            out["latents"].append(latents.to(dtype).cpu())
        captions = [examples.captions[i] for i in idx]
        states, _ = encoder.encode_with_mask(captions)
        states = states.to(device=device, dtype=dtype)
        have = states.shape[1] // filler.shape[1]
        if have < max_chunks:
            states = torch.cat([states, filler.expand(len(idx), -1, -1).repeat(1, max_chunks - have, 1)], dim=1)
        out["states"].append(states.cpu())
        out["chunks"].append(torch.tensor(chunk_counts(encoder, captions), dtype=torch.int64))
        if english:
            assert examples.english is not None
            texts = [examples.english[i] for i in idx]
            eng = encode_backbone_text(backbone, [t or "" for t in texts], device)
            out["english"].append(eng.context.to(dtype).cpu())
            for key, value in eng.added.items():
                out.setdefault(f"english_added.{key}", []).append(value.to(dtype).cpu())
            out["parallel"].append(torch.tensor([t is not None for t in texts], dtype=torch.uint8))
        if progress is not None:
            progress(len(idx))
    return {k: torch.cat(v) for k, v in out.items() if v}


def weights_digest(*modules: torch.nn.Module) -> str:
    """A short digest of modules' weights (names, shapes and sums), to tell whether a cache is still valid."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            t = tensor.detach().float()
            h.update(f"{name}:{tuple(t.shape)}:{t.sum().item():.8e}:{t.abs().sum().item():.8e}".encode())
    return h.hexdigest()[:16]


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
