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
from collections.abc import Callable, Iterator, Sequence
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
    #: a dataset read row by row into the sharded on-disk cache (``n`` is then known once it is encoded)
    stream: RowStream | None = None


# --------------------------------------------------------------------------- sources


def load_examples(registry: Registry, entry: LanguageEntry, *, image_size: int, seed: int,
                  num_samples: int | None = None, need_english: bool = False, objects: str | None = None,
                  dataset: Any = None) -> Examples:
    """The examples of ``entry``'s ``data:`` section (see the module doc). ``need_english``: the branch type
    distils from the English parallel caption, so ``data.english_column`` must name one. ``objects``
    overrides ``data.objects`` (synthetic data only). ``dataset``: a ``datasets`` Dataset or IterableDataset to
    read instead of opening ``data.dataset`` (with the entry's columns and options)."""
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
    if data.dataset == SYNTHETIC and dataset is None:
        return _synthetic(registry, entry, n or 20000, seed, image_size, english_column, objects)
    if objects != "all":
        raise DataError(f"objects={objects!r} chooses which objects synthetic scenes draw; dataset "
                        f"{data.dataset} ({entry.file}) is not synthetic, so its images are what they are")
    return _from_datasets(entry, n, image_size, english_column, seed, dataset)


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


#: A local file's datasets builder, by its extension.
_EXTENSION_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                      ".tar": "webdataset", ".arrow": "arrow"}
#: What ``data.format`` may name: a ``datasets`` builder, or ``saved`` (a ``save_to_disk`` folder).
FORMATS = ("saved", "imagefolder", "parquet", "csv", "json", "webdataset", "arrow")


def open_dataset(entry: LanguageEntry, streaming: bool | None = None) -> Any:
    """The ``datasets.Dataset`` (``streaming``: ``IterableDataset``) named by ``entry.data``: a ``save_to_disk``
    folder, a folder or file any ``datasets`` builder reads (image folder with metadata, parquet, csv/jsonl with image
    paths, webdataset tars, arrow; ``data.format`` names the builder where the files do not tell), or a hub id."""
    import datasets

    data = entry.data
    assert data is not None
    streaming = data.streaming if streaming is None else streaming
    source = entry.resolve(data.dataset)
    where = f"{entry.file}, key data.dataset"
    fmt = data.format
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"data.format {fmt!r} ({entry.file}) is not a format polybridge reads; valid: "
                        f"{', '.join(FORMATS)}")
    if isinstance(source, Path):
        if not source.exists():
            raise DataError(f"dataset {source} does not exist ({where})")
        if fmt == "saved" or (fmt is None and source.is_dir()
                              and any((source / m).is_file() for m in _SAVED_DATASET_MARKERS)):
            ds = _read(lambda: datasets.load_from_disk(str(source)), source, "a save_to_disk folder", where)
        elif source.is_file():
            fmt = fmt or _EXTENSION_FORMATS.get(source.suffix.lower())
            if fmt is None:
                raise DataError(f"dataset {source}: cannot tell the format of a {source.suffix or 'nameless'} file; "
                                f"set data.format ({', '.join(FORMATS[1:])}) ({where})")
            ds = _read(lambda: datasets.load_dataset(fmt, data_files=str(source), streaming=streaming), source, fmt,
                       where)
        elif fmt is not None:
            ds = _read(lambda: datasets.load_dataset(fmt, data_dir=str(source), streaming=streaming), source, fmt,
                       where)
        else:  # the files tell the builder, as on the hub (a hub dataset's local copy reads the same)
            ds = _read(lambda: datasets.load_dataset(str(source), streaming=streaming), source, "", where)
    else:
        ds = _read(lambda: datasets.load_dataset(source, streaming=streaming), source, "", where)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if data.split not in ds:
            raise DataError(f"dataset {source} has no split {data.split!r} ({entry.file}, key data.split); "
                            f"valid: {', '.join(ds)}")
        ds = ds[data.split]
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    return ds


def _read(load: Callable[[], Any], source: Any, fmt: str, where: str) -> Any:
    try:
        return load()
    except DataError:
        raise
    except Exception as exc:  # datasets' errors for an unreadable source are of many types
        how = f"as {fmt}" if fmt else "with any datasets builder (set data.format to name one)"
        raise DataError(f"dataset {source}: not readable {how}: {type(exc).__name__}: {exc} ({where})") from None


def _from_datasets(entry: LanguageEntry, n: int | None, size: int, english_column: str | None, seed: int,
                   ds: Any = None) -> Examples:
    data = entry.data
    assert data is not None
    name = f"dataset {data.dataset} ({entry.file})"
    ds = open_dataset(entry) if ds is None else ds
    source = entry.resolve(data.dataset)
    base = (source if source.is_dir() else source.parent) if isinstance(source, Path) and source.exists() else None
    stream = RowStream(ds, caption_column=data.caption_column, english_column=english_column,
                       image_column=data.image_column, name=name, image_size=size, crop=data.crop,
                       bad_rows=data.bad_rows, seed=seed, num_samples=n, base=base, shard_rows=data.cache_shard_rows)
    n_known = min(len(ds), n or len(ds)) if hasattr(ds, "__len__") else 0
    return Examples(n=n_known, captions=[], english=[] if english_column else None, read_images=stream.read_unsupported,
                    description={"dataset": name, "format": data.format, "split": data.split,
                                 "streaming": not hasattr(ds, "__len__"), "num_samples": n, "size": size,
                                 "crop": data.crop, "seed": seed if data.crop == "random" else None,
                                 "bad_rows": data.bad_rows, "caption_column": data.caption_column,
                                 "english_column": english_column,
                                 "fingerprint": getattr(ds, "_fingerprint", None) or _source_stamp(source)},
                    stream=stream)


def _source_stamp(source: Any) -> str | None:
    """Names and sizes of a local source's files (a stream has no fingerprint): another file, another key; a file
    restored (copied back, with a new time) after it disappeared keeps the key, so its cache is continued."""
    if not isinstance(source, Path) or not source.exists():
        return None
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    return cache_key({str(f.relative_to(source) if f != source else f.name): f.stat().st_size for f in files})


class BadRow(Exception):
    """A row that cannot be used (``bad_rows: skip`` counts it; ``error`` raises a DataError with the reason)."""


@dataclass
class RowStream:
    """A dataset read row by row, for the on-disk cache: each process reads its own shard
    (``datasets.distributed.split_dataset_by_node``), never the whole dataset, and never holds it in memory."""

    ds: Any
    caption_column: str
    english_column: str | None
    image_column: str
    name: str
    image_size: int
    crop: str = "center"
    bad_rows: str = "error"
    seed: int = 0
    num_samples: int | None = None
    base: Path | None = None
    shard_rows: int = 1024

    def __post_init__(self) -> None:
        _check_columns(self.ds, self.name, self.image_column, self.caption_column, self.english_column)

    def read_unsupported(self, indices: Sequence[int]) -> torch.Tensor:
        raise DataError(f"{self.name}: read row by row (RowStream.rows), not by index")

    def split(self, rank: int, world: int) -> tuple[Any, str]:
        """This process's part of the dataset and how the parts were made (``shards``: contiguous runs of files,
        so the parts in rank order are the dataset's order; ``examples``: every ``world``-th row, interleaved)."""
        import datasets
        from datasets.distributed import split_dataset_by_node

        ds = self.ds
        if isinstance(ds, datasets.Dataset):
            if self.num_samples is not None and self.num_samples < len(ds):
                ds = ds.select(range(self.num_samples))
            ds = ds.to_iterable_dataset()
        elif self.num_samples is not None:
            ds = ds.take(self.num_samples)
        strategy = "shards" if world == 1 or ds.num_shards % world == 0 else "examples"
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        return ds, strategy

    def rows(self, part: Any, start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(position in this part, (caption, english, pixels) or a BadRow)`` from row ``start`` of ``part``."""
        import datasets

        features = getattr(part, "features", None) or {}
        if isinstance(features.get(self.image_column), datasets.Image):
            part = part.cast_column(self.image_column, datasets.Image(decode=False))  # corrupt images reach _decode
        if start:
            part = part.skip(start)
        position = start
        iterator = iter(part)
        while True:
            try:
                row = next(iterator)
            except StopIteration:
                return
            except (FileNotFoundError, OSError) as exc:
                raise DataError(f"{self.name}: a file of the dataset could not be read at row {position} of this "
                                f"process's part ({type(exc).__name__}: {exc}); the cache keeps what was encoded "
                                "before it: restore the file and run again to continue from there") from None
            try:
                yield position, self._row(row, position)
            except BadRow as bad:
                yield position, bad
            position += 1

    def _row(self, row: dict, position: int) -> tuple[str, str | None, torch.Tensor]:
        caption = row.get(self.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            raise BadRow(f"column {self.caption_column!r} holds {type(caption).__name__} {caption!r}, not text")
        english = None
        if self.english_column is not None:
            english = row.get(self.english_column)
            if english is not None and not isinstance(english, str):
                raise BadRow(f"column {self.english_column!r} holds {type(english).__name__} {english!r}, not text")
            english = english or None
        image = decode_image(row.get(self.image_column), self.base)
        pixels = fit_image(image, self.image_size, self.crop, (self.seed, position, caption))
        return caption, english, pixels


def decode_image(value: Any, base: Path | None = None) -> Any:
    """A PIL image from what a dataset's image cell holds (an image, ``{"bytes", "path"}``, bytes, or a path,
    relative to ``base``); :class:`BadRow` when it is missing or does not decode."""
    import io

    import PIL.Image
    import PIL.ImageOps

    try:
        if isinstance(value, PIL.Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = PIL.Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else \
                PIL.Image.open(_path(value["path"], base))
        elif isinstance(value, (bytes, bytearray)):
            image = PIL.Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value:
            image = PIL.Image.open(_path(value, base))
        else:
            raise BadRow(f"no image ({type(value).__name__} {str(value)[:60]!r})")
        image.load()
        if image.getexif().get(0x0112, 1) != 1:  # a camera's orientation tag: the image as it is meant to be seen
            image = PIL.ImageOps.exif_transpose(image)
    except BadRow:
        raise
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise BadRow(f"the image does not decode ({type(exc).__name__}: {exc})") from None
    return image


def _path(value: str, base: Path | None) -> Path:
    path = Path(value)
    return path if path.is_absolute() or base is None else base / path


def fit_image(image: Any, size: int, crop: str = "center", key: Any = None) -> torch.Tensor:
    """``image`` (any size and mode) as the backbone reads it: RGB, the shorter side resized to ``size`` (bicubic),
    the ``center`` square or a ``random`` one (drawn from ``key``, the same on every run) cut out; pixels in [-1, 1].
    An RGB image already ``size`` x ``size`` is used as it is."""
    import PIL.Image

    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(white, rgba)
        elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float greys: scale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode != "F" and array.max() > 255 else (array.max() or 1.0)
            image = PIL.Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
        image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        image = image.resize(new, PIL.Image.BICUBIC, reducing_gap=3.0)
        w, h = new
        if crop == "random":
            rng = np.random.default_rng(int(cache_key({"crop": key})[:12], 16))
            left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        else:
            left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def _check_columns(ds: Any, name: str, image_column: str, caption_column: str, english_column: str | None) -> None:
    columns = list(ds.column_names or []) if ds.column_names is not None else None
    if columns is None:  # a stream whose columns are not known before its first row
        first = next(iter(ds.take(1)), None)
        columns = list(first) if first is not None else []
    for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column),
                        ("data.english_column", english_column)):
        if column is not None and column not in columns:
            raise DataError(f"{name}: {key}: no column {column!r}; its columns are {', '.join(columns) or '(none)'}")


def examples_from_dataset(ds: Any, *, caption_column: str, image_column: str = "image",
                          english_column: str | None = None, num_samples: int | None = None, image_size: int,
                          name: str = "dataset", crop: str = "center", seed: int = 0) -> Examples:
    """Examples from a ``datasets.Dataset`` held in memory, checked: columns present, not empty, captions are text;
    images resized and cropped to ``image_size`` as they are read (the first row now)."""
    import datasets

    _check_columns(ds, name, image_column, caption_column, english_column)
    if len(ds) == 0:
        raise DataError(f"{name}: the dataset is empty (0 rows); give it image/caption rows")
    if num_samples is not None and num_samples < len(ds):
        ds = ds.select(range(num_samples))
    captions = _texts(ds[caption_column], name, caption_column)
    english = [e or None for e in _texts(ds[english_column], name, english_column, missing_ok=True)] \
        if english_column else None
    images = ds.select_columns([image_column])
    if isinstance(images.features.get(image_column), datasets.Image):
        images = images.cast_column(image_column, datasets.Image(decode=False))  # a corrupt image reaches _pixels

    def read(indices: Sequence[int]) -> torch.Tensor:
        rows = images[list(indices)][image_column]
        return torch.stack([_pixels(im, int(i), name, image_column, image_size, crop, (seed, int(i), captions[int(i)]))
                            for im, i in zip(rows, indices)])

    read([0])  # an image that does not decode fails now, before anything is loaded
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


def _pixels(image: Any, row: int, name: str, column: str, size: int, crop: str = "center",
            key: Any = None) -> torch.Tensor:
    import PIL.Image

    if image is not None and not isinstance(image, (PIL.Image.Image, dict, str, bytes)):
        raise DataError(f"{name}: row {row}: column {column!r} holds {type(image).__name__}, not an image "
                        "(use a datasets.Image() feature)")
    try:
        return fit_image(decode_image(image), size, crop, key)
    except BadRow as bad:
        raise DataError(f"{name}: row {row}: column {column!r}: {bad}") from None


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


# --------------------------------------------------------------------------- the sharded on-disk cache

#: A process's part of the sharded cache: ``part-<rank>-of-<processes>/shard-<k>.safetensors`` plus ``done.json``.
_PART = "part-{rank:05d}-of-{world:05d}"
_DONE = "done.json"
_SKIPPED = "skipped.jsonl"


def encode_stream_part(stream: RowStream, folder: Path, key: str, rank: int, world: int, *, vae: Any, encoder: Any,
                       backbone: Any, english: bool, device: Any, dtype: torch.dtype, batch_size: int = 256,
                       log: Callable[[str], None] = print, progress: Callable[[int], None] | None = None) -> dict:
    """Encode this process's part of ``stream`` into ``folder/part-<rank>-of-<world>/``, ``stream.shard_rows``
    examples a file, each written whole (temporary name, then renamed) as soon as it is encoded, so a kill loses at
    most the file being written and a second run continues after the last one written. Returns ``done.json``."""
    from safetensors.torch import save_file

    from polybridge.atomic import atomic_write_text

    part_dir = folder / _PART.format(rank=rank, world=world)
    done_file = part_dir / _DONE
    if done_file.is_file():
        done = json.loads(done_file.read_text(encoding="utf-8"))
        if done.get("key") == key:
            return done
    part_dir.mkdir(parents=True, exist_ok=True)
    for stale in part_dir.glob("shard-*.tmp"):  # a file a kill interrupted: written again below
        stale.unlink()
    shards = _shard_files(part_dir)
    consumed, rows, skipped = 0, 0, 0
    for shard in shards:
        meta = _shard_meta(shard, key)
        consumed, rows, skipped = int(meta["consumed"]), rows + int(meta["rows"]), skipped + int(meta["skipped"])
    if shards:
        log(f"{stream.name}: continuing the cache of process {rank} after {len(shards)} files ({rows} examples)")
    part, strategy = stream.split(rank, world)
    pending: list[tuple[str, str | None, torch.Tensor]] = []
    bad: list[dict] = []
    position = consumed

    def flush() -> None:
        nonlocal rows, skipped, pending, bad
        index = len(_shard_files(part_dir))
        tensors: dict[str, torch.Tensor] = {}
        if pending:
            captions = [p[0] for p in pending]
            eng = [p[1] for p in pending] if english else None
            pixels = [p[2] for p in pending]
            examples = Examples(n=len(pending), captions=captions, english=eng,
                                read_images=lambda idx: torch.stack([pixels[i] for i in idx]))
            tensors = encode_examples(examples, range(len(pending)), vae=vae, encoder=encoder, backbone=backbone,
                                      max_chunks=max(chunk_counts(encoder, captions)), english=english, device=device,
                                      dtype=dtype, batch_size=batch_size)
        meta = {"key": key, "rows": str(len(pending)), "consumed": str(position), "skipped": str(len(bad)),
                "skipped_rows": json.dumps(bad, ensure_ascii=False)}
        name = part_dir / f"shard-{index:06d}.safetensors"
        tmp = name.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()} or {"empty": torch.zeros(0)}, str(tmp),
                  metadata=meta)
        tmp.replace(name)
        rows, skipped = rows + len(pending), skipped + len(bad)
        if progress is not None:
            progress(len(pending))
        pending, bad = [], []

    for position_read, row in stream.rows(part, consumed):
        position = position_read + 1
        if isinstance(row, BadRow):
            where = f"{stream.name}: row {position_read} of process {rank}'s part ({strategy} of {world})"
            if stream.bad_rows == "error":
                raise DataError(f"{where}: {row}; fix the row, or set data.bad_rows: skip to count and log such rows "
                                "and train without them")
            bad.append({"row": position_read, "reason": str(row)})
            log(f"{where}: skipped: {row}")
            continue
        pending.append(row)
        if len(pending) >= stream.shard_rows:
            flush()
    if pending or bad:
        flush()
    files = _shard_files(part_dir)
    skipped_rows = [row for f in files for row in json.loads(_shard_meta(f, key).get("skipped_rows") or "[]")]
    if skipped_rows:  # from the files' own records, so a run killed and continued lists each row once
        atomic_write_text(part_dir / _SKIPPED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped_rows))
    done = {"key": key, "rows": rows, "skipped": skipped, "strategy": strategy, "rank": rank, "world": world,
            "files": len(files)}
    atomic_write_text(done_file, json.dumps(done) + "\n")
    return done


def _shard_files(part_dir: Path) -> list[Path]:
    return sorted(part_dir.glob("shard-*.safetensors"))


def _shard_meta(file: Path, key: str) -> dict:
    """A cache file's metadata, checked to be of this run's encoders, backbone and data (``key``)."""
    try:
        with open(file, "rb") as fh:
            meta = json.loads(fh.read(int.from_bytes(fh.read(8), "little"))).get("__metadata__") or {}
    except (OSError, ValueError) as exc:
        raise DataError(f"cache file {file} is unreadable ({type(exc).__name__}: {exc}); delete it and run again: "
                        "the files before it are kept") from None
    if meta.get("key") != key:
        raise DataError(f"cache file {file} was written for other encoders, backbone or data (key "
                        f"{meta.get('key')!r}, this run's is {key!r}); it is not read: delete {file.parent.parent} "
                        "or give another --work")
    return meta


class ShardedRows:
    """One tensor of the sharded cache, read memory-mapped: indexing reads only the rows asked for, from the files
    that hold them (``numpy.memmap`` over the tensor's bytes in the safetensors file), never the whole tensor or a
    whole file; at most ``open_files`` files are mapped at a time. States of files encoded with fewer chunks are
    filled up, in a batch, with ``filler`` (the empty prompt's chunk), as :func:`encode_examples` fills them."""

    open_files = 16

    def __init__(self, name: str, files: list[Path], starts: np.ndarray, rows: int, row_shape: tuple[int, ...],
                 dtype: torch.dtype, filler: torch.Tensor | None = None):
        from collections import OrderedDict

        self.name, self.files, self.starts, self.filler = name, files, starts, filler
        self.shape = (rows, *row_shape)
        self.dtype = dtype
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def _map(self, k: int) -> np.memmap:
        if k in self._maps:
            self._maps.move_to_end(k)
            return self._maps[k]
        try:
            dtype, shape, offset = safetensors_layout(self.files[k])[self.name]
            array = np.memmap(self.files[k], dtype=_NUMPY_DTYPES[dtype], mode="r", offset=offset, shape=tuple(shape))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cache file {self.files[k]} cannot be read any more ({type(exc).__name__}: {exc}); "
                            f"the last checkpoint is kept: delete {self.files[k].parent} and run again with --resume "
                            "to encode that part again") from None
        self._maps[k] = array
        if len(self._maps) > self.open_files:
            self._maps.popitem(last=False)
        return array

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> torch.Tensor:
        indices = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
        files = np.searchsorted(self.starts, indices, side="right") - 1
        rows = []
        for i, k in zip(indices, files):
            row = torch.from_numpy(np.array(self._map(int(k))[i - int(self.starts[k])]))[None]
            rows.append(row.view(torch.bfloat16) if self.dtype == torch.bfloat16 else row)
        if self.filler is not None:
            width = max(r.shape[1] for r in rows)
            rows = [r if r.shape[1] == width else
                    torch.cat([r, self.filler.to(r.dtype).repeat(1, (width - r.shape[1]) // self.filler.shape[1], 1)],
                              dim=1) for r in rows]
        return torch.cat(rows)


def safetensors_layout(file: Path) -> dict[str, tuple[str, list[int], int]]:
    """Each tensor of a safetensors file: (dtype, shape, byte offset of its data in the file), from its header."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return {name: (t["dtype"], t["shape"], 8 + size + t["data_offsets"][0])
            for name, t in header.items() if name != "__metadata__"}


#: safetensors dtypes as numpy reads them (bfloat16 as its 16 bits, viewed back as torch.bfloat16).
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "U8": np.uint8}


def read_sharded_cache(folder: Path, key: str, world: int) -> tuple[dict[str, Any], dict]:
    """The tensors of a complete sharded cache (``world`` parts), memory-mapped, in the dataset's order (parts in
    rank order, or interleaved where the parts took every ``world``-th row), and what its parts record."""
    dones = []
    for rank in range(world):
        done_file = folder / _PART.format(rank=rank, world=world) / _DONE
        done = json.loads(done_file.read_text(encoding="utf-8"))
        if done.get("key") != key:
            raise DataError(f"{done_file} was written for other encoders, backbone or data; delete {folder}")
        dones.append(done)
    files: list[Path] = []
    counts: list[int] = []
    for rank, done in enumerate(dones):
        part_files = _shard_files(folder / _PART.format(rank=rank, world=world))
        if len(part_files) != done["files"]:
            raise DataError(f"{folder / _PART.format(rank=rank, world=world)} holds {len(part_files)} cache files, "
                            f"{done['files']} were written: delete that folder and run again (with --resume after a "
                            "checkpoint) to encode that part again")
        for f in part_files:
            meta = _shard_meta(f, key)
            if int(meta["rows"]):
                files.append(f)
                counts.append(int(meta["rows"]))
    total = sum(counts)
    summary = {"rows": total, "skipped": sum(d["skipped"] for d in dones), "files": len(files)}
    if total == 0:
        raise DataError(f"the dataset gave no usable rows ({summary['skipped']} skipped; see "
                        f"{folder}/part-*/{_SKIPPED})")
    strategy = dones[0]["strategy"]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    order = None
    if strategy == "examples" and world > 1:  # the dataset's row i is part i % world's row i // world
        per_part = [d["rows"] for d in dones]
        part_start = np.concatenate([[0], np.cumsum(per_part)[:-1]])
        order = np.array([part_start[r] + k for k in range(max(per_part)) for r in range(world) if k < per_part[r]],
                         dtype=np.int64)
    layout = safetensors_layout(files[0])
    tensors: dict[str, Any] = {}
    for name, (dtype, shape, _) in layout.items():
        rows = ShardedRows(name, files, starts, total, tuple(shape[1:]), _DTYPES[dtype])
        tensors[name] = rows if order is None else _Reordered(rows, order)
    summary["strategy"] = strategy
    return tensors, summary


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8}


class _Reordered:
    """``rows`` read through ``order`` (dataset row -> cache row)."""

    def __init__(self, rows: ShardedRows, order: np.ndarray):
        self.rows, self.order, self.shape, self.dtype = rows, order, rows.shape, rows.dtype

    @property
    def filler(self) -> torch.Tensor | None:
        return self.rows.filler

    @filler.setter
    def filler(self, value: torch.Tensor | None) -> None:
        self.rows.filler = value

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        indices = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        return self.rows[[int(self.order[int(i)]) for i in indices]]


def sharded_encodings(examples: Examples, folder: Path, key: str, *, rank: int, world: int,
                      barrier: Callable[[], None], vae: Any, encoder: Any, backbone: Any, device: Any,
                      dtype: torch.dtype, batch_size: int = 256, log: Callable[[str], None] = print,
                      progress: Callable[[int], None] | None = None) -> EncodedExamples:
    """A dataset's frozen encodings through the sharded cache in ``folder``: each process encodes its own part of
    the data (or continues it after a kill), then every process reads the whole cache memory-mapped; ``examples.n``
    becomes the number of usable rows."""
    assert examples.stream is not None
    english = examples.english is not None
    encode_stream_part(examples.stream, folder, key, rank, world, vae=vae, encoder=encoder, backbone=backbone,
                       english=english, device=device, dtype=dtype, batch_size=batch_size, log=log, progress=progress)
    barrier()
    tensors, summary = read_sharded_cache(folder, key, world)
    with torch.no_grad():
        tensors["empty_states"] = encoder.encode([""]).to(dtype).cpu()
        empty = encode_backbone_text(backbone, [""], device)
        tensors["empty_context"] = empty.context.to(dtype).cpu()
        tensors.update({f"empty_added.{k}": v.to(dtype).cpu() for k, v in empty.added.items()})
    tensors["states"].filler = tensors["empty_states"]
    examples.n = summary["rows"]
    skipped = f", {summary['skipped']} rows skipped (see {folder}/part-*/{_SKIPPED})" if summary["skipped"] else ""
    log(f"{examples.stream.name}: {summary['rows']} examples in {summary['files']} cache files in {folder}{skipped}")
    return EncodedExamples.from_tensors(tensors)
