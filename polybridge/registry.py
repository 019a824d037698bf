"""The language registry: ``registry.yaml`` plus one ``languages/<code>/language.yaml`` per language.

Adding a language is data, not code. Everything is parsed into typed, frozen dataclasses and
validated at the edge: an unknown key, a wrong type, a missing file, a duplicate code or an unknown
branch type raises :class:`RegistryError` naming the file, the key and what would be valid, and
nothing is half-loaded (the :class:`Registry` is built only once every entry has parsed).

Sources (encoder, tokenizer, branch weights, datasets) are either a hub id (``org/name``) or a
local path, which must start with ``./``, ``../`` or ``/`` and is resolved against the folder of
the file that names it. Local weights that are built later (an encoder, a branch) may be absent:
:meth:`LanguageEntry.status` reports them; loading them is where a missing file becomes an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
import types
import typing
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from polybridge import catalog
from polybridge.errors import PolyBridgeError
from polybridge.unicode_scripts import KNOWN_SCRIPTS

REGISTRY_FILE = "registry.yaml"
LANGUAGE_FILE = "language.yaml"
REGISTRY_ENV = "POLYBRIDGE_REGISTRY"


#: Common transformers classes a native encoder is loaded with (suggestions for a misspelt name: any transformers
#: model class that takes ``input_ids`` serves, a full CLIP-style checkpoint with ``encoder.text_tower``).
ENCODER_CLASSES: tuple[str, ...] = (
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "ChineseCLIPTextModel",
    "AltCLIPTextModel",
    "XLMRobertaModel",
    "BertModel",
    "RobertaModel",
    "T5EncoderModel",
    "MT5EncoderModel",
    "UMT5EncoderModel",
    "SiglipTextModel",
    "AutoModel",
    "CLIPModel",
    "ChineseCLIPModel",
    "AltCLIPModel",
)

#: What happens to a prompt in a language whose branch is not trained (see README, "Fallbacks").
FALLBACKS: tuple[str, ...] = ("zero-branch", "backbone", "error")
#: What synthetic training scenes draw (``data.objects``, see :class:`DataSpec`).
DataObjects = Literal["all", "own"]
DATA_OBJECTS: tuple[str, ...] = typing.get_args(DataObjects)

CODE_PATTERN = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class RegistryError(PolyBridgeError, ValueError):
    """A registry file is wrong. The message names the file, the key and what would be valid."""

    def __init__(self, file: str | Path, key: str | None, problem: str, valid: typing.Iterable[str] | None = None):
        self.file = str(file)
        self.key = key
        self.problem = problem
        self.valid = tuple(valid) if valid is not None else None
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        message = where + problem
        if self.valid is not None:
            message += "; valid: " + (", ".join(self.valid) if self.valid else "(none)")
        super().__init__(message)


# --------------------------------------------------------------------------- sources


def is_local_source(source: str) -> bool:
    """Local paths are explicit (``./``, ``../``, ``/``, ``~``); anything else is a hub id."""
    return source.startswith(("./", "../", "/", "~")) or source in (".", "..")


def resolve_source(source: str, base: Path) -> Path | str:
    """A local source as an absolute :class:`Path` (relative to ``base``), a hub id unchanged."""
    if is_local_source(source):
        return (base / Path(source).expanduser()).resolve()
    return source


# --------------------------------------------------------------------------- typed entries


def _derived(default: Any = None) -> Any:
    """A field filled in by the loader (not read from YAML)."""
    return field(default=default, metadata={"derived": True}, compare=False)


@dataclass(frozen=True)
class EncoderSpec:
    """The native text encoder: a transformers text model and its tokenizer."""

    source: str
    model_class: str
    tokenizer: str
    tokenizer_class: str = "auto"
    hidden_layer: int = -1
    max_length: int = 64
    revision: str | None = None
    trust_remote_code: bool = False
    #: a full checkpoint's text tower, the attribute that holds it (``text_model`` of CLIPModel, ChineseCLIPModel,
    #: AltCLIPModel); ``None``: ``model_class`` is the text model itself.
    text_tower: str | None = None
    #: the weights' variant (``fp16``: ``model.fp16.safetensors``); ``None``: the plain ``model.safetensors``.
    variant: str | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """Hyperparameters the common trainer reads; command-line flags override them.

    ``batch_size`` is the *global* batch of one optimizer step (all processes and accumulation steps
    together), so an entry means the same run on one CPU, one GPU or eight. Loss weights: ``denoise_weight``
    (MSE to the noise), and for branch types that distil (pea) ``distill_output_weight`` (MSE to the
    backbone's noise prediction for the English parallel caption) and ``distill_weight`` (sum over the
    UNet's down, mid and up blocks of the MSE of their hidden states). ``snr_gamma``: min-SNR-gamma weighting
    of the denoising MSE (Hang et al. 2023, diffusers' ``--snr_gamma``; 5.0 is the paper's value); ``None``:
    plain MSE.
    """

    learning_rate: float = 5e-4
    batch_size: int = 64
    max_steps: int = 2500
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    caption_dropout: float = 0.1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    denoise_weight: float = 1.0
    snr_gamma: float | None = None
    distill_output_weight: float = 1.0
    distill_weight: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class BranchSpec:
    """The trained branch: its type, where its weights live (``null`` until trained), how to train it."""

    type: str
    weights: str | None = None
    scale: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    training: TrainingSpec = field(default_factory=TrainingSpec)


@dataclass(frozen=True)
class DataSpec:
    """Training data: ``synthetic`` (this project's world), a hub dataset id or a local path."""

    dataset: str
    caption_column: str
    english_column: str | None = None
    image_column: str = "image"
    split: str = "train"
    num_samples: int | None = None
    #: synthetic only: which objects the scenes draw. ``all``: every drawable object (another language's concept
    #: is an unnamed "object" in this language's captions); ``own``: the generic shapes plus this language's
    #: ``synthetic.concepts``, the objects its captions name.
    objects: DataObjects = "all"
    #: a ``datasets`` builder that reads the source (``parquet``, ``csv``, ``json``, ``webdataset``, ``arrow``,
    #: ``imagefolder``; ``saved``: ``load_from_disk``); ``None``: told by the files (see branch_data).
    format: str | None = None
    #: after the shorter side is resized to the backbone's resolution: the ``center`` square or a ``random`` one
    #: (drawn per example from the run's seed, so the same on every run and process count).
    crop: Literal["center", "random"] = "center"
    #: a row whose image is corrupt or missing, or whose caption is missing or empty: ``error`` (stop, naming it) or
    #: ``skip`` (counted, logged, recorded in train_info.json).
    bad_rows: Literal["error", "skip"] = "error"
    #: read the source as a stream (``datasets`` IterableDataset): never held in memory, each process its own shard.
    streaming: bool = False
    #: examples per file of the on-disk cache of encodings (written as they are made, read memory-mapped).
    cache_shard_rows: int = 1024

@dataclass(frozen=True)
class SyntheticSpec:
    """This language's part of the synthetic world: its caption grammar and the concepts it owns."""

    grammar: str
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchmarkSpec:
    """Benchmark prompts: files of curated prompts plus a sample of the synthetic test split.

    ``clip_model`` scores the curated prompts (no ground truth): a CLIP-style model (hub id or local path,
    loaded with transformers ``AutoModel`` / ``AutoProcessor``, or a world-CLIP folder); ``null``: the curated
    suite is skipped. The synthetic suites are scored with the ground-truth scorer and the world CLIP.
    """

    prompt_sets: tuple[str, ...] = ()
    synthetic_split: Literal["train", "validation", "test"] = "test"
    synthetic_prompts: int = 200
    seed: int = 0
    clip_model: str | None = None


@dataclass(frozen=True)
class DetectionSpec:
    """What the router reads about this language besides its ``scripts``.

    ``seed_words``: a word list in this folder (``seed_words.txt``, written by ``scripts/build_seed_words.py``
    from the folder's hand-written ``prompt_words.txt`` and its grammar): frequent words of its prompts, one a
    line, lowercase letters, ``#`` comments. The router has lingua score them when it loads, so that routing
    rarely waits for lingua; they change how fast prompts route, never where. ``null``: none. The list is
    checked when the entry loads (:func:`read_word_list`); :attr:`LanguageEntry.seed_words` reads it.
    """

    seed_words: str | None = None


@dataclass(frozen=True)
class LanguageEntry:
    """One registered language. ``encoder`` and ``branch`` are ``null`` for the backbone's own language."""

    code: str
    name: str
    scripts: tuple[str, ...]
    native_name: str | None = None
    encoder: EncoderSpec | None = None
    branch: BranchSpec | None = None
    data: DataSpec | None = None
    synthetic: SyntheticSpec | None = None
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    detection: DetectionSpec = field(default_factory=DetectionSpec)
    fallback: str = "zero-branch"
    folder: Path = _derived()
    file: Path = _derived()

    @property
    def is_backbone_language(self) -> bool:
        return self.encoder is None

    def resolve(self, source: str) -> Path | str:
        """A source named in this entry: absolute path for local ones, hub id otherwise."""
        return resolve_source(source, self.folder)

    @property
    def grammar_path(self) -> Path | None:
        return None if self.synthetic is None else Path(self.resolve(self.synthetic.grammar))

    @property
    def seed_words(self) -> tuple[str, ...]:
        """The router's seed words for this language (the list ``detection.seed_words`` names; none when not
        given). Read from the file on each call (a few ms; the router reads them once), so that the entry stays
        what its file says."""
        if self.detection.seed_words is None:
            return ()
        return read_word_list(Path(self.resolve(self.detection.seed_words)), self.file, "detection.seed_words")

    @property
    def tokenizer_source(self) -> Path | str | None:
        return None if self.encoder is None else self.resolve(self.encoder.tokenizer)

    @property
    def encoder_source(self) -> Path | str | None:
        return None if self.encoder is None else self.resolve(self.encoder.source)

    @property
    def branch_source(self) -> Path | str | None:
        if self.branch is None or self.branch.weights is None:
            return None
        return self.resolve(self.branch.weights)

    def status(self) -> dict[str, str]:
        """Whether each built artifact is present: ``present``, ``missing``, ``hub`` or ``none``."""

        def state(src: Path | str | None) -> str:
            if src is None:
                return "none"
            if isinstance(src, str):
                return "hub"
            return "present" if src.exists() else "missing"

        return {
            "tokenizer": state(self.tokenizer_source),
            "encoder": state(self.encoder_source),
            "branch": state(self.branch_source),
        }


@dataclass(frozen=True)
class BackboneSpec:
    """A frozen English-native backbone in diffusers format."""

    source: str
    architecture: str = "sd1"
    language: str = "en"
    description: str = ""
    revision: str | None = None
    name: str = _derived("")


@dataclass(frozen=True)
class RegistrySpec:
    """The top-level ``registry.yaml`` as written (before the language files are read)."""

    backbones: dict[str, BackboneSpec]
    default_backbone: str
    languages: tuple[str, ...]
    fallback_language: str = "en"
    detection_threshold: float = 0.5
    version: int = 1


@dataclass(frozen=True)
class Registry:
    """The whole registry, every language parsed and cross-checked."""

    root: Path
    file: Path
    backbones: Mapping[str, BackboneSpec]
    default_backbone: str
    languages: Mapping[str, LanguageEntry]
    fallback_language: str
    detection_threshold: float

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(self.languages)

    def language(self, code: str) -> LanguageEntry:
        try:
            return self.languages[code]
        except KeyError:
            raise RegistryError(self.file, "languages", f"unknown language code {code!r}{_suggest(code, self.languages)}",
                                valid=self.languages) from None

    def backbone(self, name: str | None = None) -> BackboneSpec:
        name = name or self.default_backbone
        try:
            return self.backbones[name]
        except KeyError:
            raise RegistryError(self.file, "backbones", f"unknown backbone {name!r}", valid=self.backbones) from None

    def backbone_source(self, name: str | None = None) -> Path | str:
        return resolve_source(self.backbone(name).source, self.root)

    @property
    def native_codes(self) -> tuple[str, ...]:
        """Languages that get a branch (every language but the backbone's)."""
        return tuple(c for c, e in self.languages.items() if not e.is_backbone_language)


# --------------------------------------------------------------------------- YAML reading


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one mapping is an error instead of silently last-wins. The one
    YAML loader of the project's data files: registry, language entries, grammars, benchmark prompt sets."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *base``: keys written here override what it brings, as YAML says
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            continue  # SafeLoader's own error names it
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path, error: typing.Callable[[Path, str | None, str], Exception] = RegistryError,
              key: str | None = None) -> Any:
    """Parse one YAML file safely (a key written twice is refused); every failure is ``error(path, key,
    problem)`` naming the file (and line): a RegistryError, or the reader's own error class (the grammar
    passes GrammarError and the key ``(yaml)``)."""
    if not path.is_file():
        raise error(path, key, "file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(path, key, f"cannot read: {exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(path, key, f"not valid YAML: {where}{problem}") from None


# --------------------------------------------------------------------------- typed parsing


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        item = typing.get_args(tp)[0]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(item, _type_name(item))}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, file: Path, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, file, key)
            except RegistryError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise RegistryError(file, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RegistryError(file, key, f"{value!r} is not allowed{_suggest(value, map(str, allowed))}",
                                valid=[str(a) for a in allowed])
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise RegistryError(file, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, file, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RegistryError(file, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, file, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, file, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise RegistryError(file, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RegistryError(file, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python reads as a number.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise RegistryError(file, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RegistryError(file, key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"registry field type {tp!r} is not supported")  # a bug in this module, not in the file


def parse_dataclass(cls: type, data: Any, file: Path, key: str = "") -> Any:
    """Build frozen dataclass ``cls`` from a YAML mapping, rejecting unknown keys and wrong types."""
    where = key or "(top level)"
    if not isinstance(data, dict):
        raise RegistryError(file, where, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for name in data:
        if name not in fields:
            raise RegistryError(file, _join(key, str(name)), f"unknown key{_suggest(name, fields)}", valid=fields)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], file, _join(key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RegistryError(file, _join(key, name), f"required key is missing ({_type_name(hints[name])})")
    return cls(**values)


def _is_transformers_name(name: str) -> bool:
    """Whether transformers exports ``name`` (its lazy module lists its names without importing the models)."""
    if not name.isidentifier():
        return False
    try:
        import transformers
    except ImportError:  # registry files are readable without transformers; loading the encoder then says so
        return True
    return name in dir(transformers)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


# --------------------------------------------------------------------------- semantic checks


def _check_source(value: str | None, file: Path, key: str, must_exist: bool) -> None:
    if value is None:
        return
    if not value.strip():
        raise RegistryError(file, key, "empty source; give a hub id (org/name) or a local path starting with ./")
    if is_local_source(value):
        if must_exist and not resolve_source(value, file.parent).exists():
            raise RegistryError(file, key, f"local path {value!r} does not exist "
                                f"(resolved to {resolve_source(value, file.parent)})")
    elif not _HUB_ID_RE.match(value):
        raise RegistryError(file, key, f"{value!r} is neither a hub id (org/name) nor a local path "
                            "(local paths start with ./, ../ or /)")


def _check_language(entry: LanguageEntry, file: Path, expected_code: str) -> None:
    if entry.code != expected_code:
        raise RegistryError(file, "code", f"{entry.code!r} does not match its folder / registry code {expected_code!r}")
    if not entry.scripts:
        raise RegistryError(file, "scripts", "at least one Unicode script is required", valid=KNOWN_SCRIPTS)
    for i, script in enumerate(entry.scripts):
        if script not in KNOWN_SCRIPTS:
            raise RegistryError(file, f"scripts[{i}]", f"unknown script {script!r}{_suggest(script, KNOWN_SCRIPTS)}",
                                valid=KNOWN_SCRIPTS)
    if entry.fallback not in FALLBACKS:
        raise RegistryError(file, "fallback", f"unknown fallback {entry.fallback!r}{_suggest(entry.fallback, FALLBACKS)}",
                            valid=FALLBACKS)
    if (entry.encoder is None) != (entry.branch is None):
        raise RegistryError(file, "branch" if entry.branch is None else "encoder",
                            "a native language needs both an encoder and a branch; the backbone's language has neither")
    if entry.encoder is not None:
        enc = entry.encoder
        if enc.model_class not in ENCODER_CLASSES and not _is_transformers_name(enc.model_class):
            raise RegistryError(file, "encoder.model_class",
                                f"unknown encoder class {enc.model_class!r}{_suggest(enc.model_class, ENCODER_CLASSES)}"
                                " (transformers has no such class)", valid=ENCODER_CLASSES)
        if enc.max_length < 1:
            raise RegistryError(file, "encoder.max_length", f"must be at least 1, got {enc.max_length}")
        _check_source(enc.source, file, "encoder.source", must_exist=False)
        _check_source(enc.tokenizer, file, "encoder.tokenizer", must_exist=False)
    if entry.branch is not None:
        br = entry.branch
        branch_types = catalog.names("branch")
        if br.type not in branch_types:
            raise RegistryError(file, "branch.type", f"unknown branch type {br.type!r}{_suggest(br.type, branch_types)}",
                                valid=branch_types)
        _check_source(br.weights, file, "branch.weights", must_exist=False)
        tr = br.training
        for name in ("learning_rate", "batch_size", "max_steps", "gradient_accumulation_steps", "checkpoint_every"):
            if getattr(tr, name) <= 0:
                raise RegistryError(file, f"branch.training.{name}", f"must be positive, got {getattr(tr, name)}")
        if not 0.0 <= tr.caption_dropout < 1.0:
            raise RegistryError(file, "branch.training.caption_dropout", f"must be in [0, 1), got {tr.caption_dropout}")
        if tr.snr_gamma is not None and tr.snr_gamma <= 0:
            raise RegistryError(file, "branch.training.snr_gamma", f"must be positive or null, got {tr.snr_gamma}")
        if not 0.0 < tr.ema_decay < 1.0:
            raise RegistryError(file, "branch.training.ema_decay", f"must be in (0, 1), got {tr.ema_decay}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "denoise_weight", "distill_output_weight",
                     "distill_weight"):
            if getattr(tr, name) < 0:
                raise RegistryError(file, f"branch.training.{name}", f"must be 0 or more, got {getattr(tr, name)}")
    if entry.data is not None and entry.data.cache_shard_rows < 1:
        raise RegistryError(file, "data.cache_shard_rows", f"must be at least 1, got {entry.data.cache_shard_rows}")
    if entry.data is not None and entry.data.dataset != "synthetic":
        _check_source(entry.data.dataset, file, "data.dataset", must_exist=True)
        if entry.data.objects != "all":
            raise RegistryError(file, "data.objects", f"{entry.data.objects!r} chooses which objects synthetic scenes "
                                "draw; a dataset's images are what they are, so leave it out (or 'all')")
    if entry.synthetic is not None:
        _check_source(entry.synthetic.grammar, file, "synthetic.grammar", must_exist=True)
        if len(set(entry.synthetic.concepts)) != len(entry.synthetic.concepts):
            raise RegistryError(file, "synthetic.concepts", "a concept is listed twice")
    if entry.data is not None and entry.data.dataset == "synthetic" and entry.synthetic is None:
        raise RegistryError(file, "data.dataset", "'synthetic' data needs a 'synthetic:' section with a grammar")
    for i, prompt_file in enumerate(entry.benchmark.prompt_sets):
        _check_source(prompt_file, file, f"benchmark.prompt_sets[{i}]", must_exist=True)
    _check_source(entry.benchmark.clip_model, file, "benchmark.clip_model", must_exist=False)
    if entry.benchmark.synthetic_prompts < 1:
        raise RegistryError(file, "benchmark.synthetic_prompts", f"must be at least 1, got {entry.benchmark.synthetic_prompts}")


#: The largest word list a registry entry may name (bytes); the shipped ones are under 30 kB.
WORD_LIST_MAX_BYTES = 1 << 20


def is_list_word(word: str) -> bool:
    """Whether ``word`` may stand on a line of a word list: one word of lowercase letters, NFC."""
    return word.isalpha() and word == word.lower() and word == unicodedata.normalize("NFC", word)


def read_word_list(path: Path, file: Path, key: str) -> tuple[str, ...]:
    """The words of the word list ``path`` (named by ``key`` in the entry ``file``): one word a line, blank
    lines and ``#`` comments skipped. A file that is missing, not a regular file, over WORD_LIST_MAX_BYTES,
    not UTF-8, or with a line that is not one lowercase word, or a word twice, is a RegistryError naming the
    entry, the key, the list and the line."""
    try:
        info = path.stat()
    except OSError:
        raise RegistryError(file, key, f"{path} does not exist; write it with "
                            f"`python scripts/build_seed_words.py --langs {file.parent.name}`") from None
    if not stat.S_ISREG(info.st_mode):
        raise RegistryError(file, key, f"{path} is not a regular file")
    if info.st_size > WORD_LIST_MAX_BYTES:
        raise RegistryError(file, key, f"{path} has {info.st_size:,} bytes; a word list may have at most "
                            f"{WORD_LIST_MAX_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(file, key, f"{path}: not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise RegistryError(file, key, f"cannot read {path}: {exc}") from None
    words: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if not is_list_word(word):
            raise RegistryError(file, key, f"{path}: line {number}: {word!r} is not one word of lowercase letters "
                                "(NFC); write one word a line, # for comments")
        if word in words:
            raise RegistryError(file, key, f"{path}: line {number}: {word!r} is listed twice (also line {words[word]})")
        words[word] = number
    return tuple(words)


def load_language(folder: Path, code: str | None = None, word_lists: bool = True) -> LanguageEntry:
    """Parse and check one ``languages/<code>/language.yaml``; ``word_lists=False`` leaves the word lists it names
    unread (for the script that writes them)."""
    folder = Path(folder).resolve()
    file = folder / LANGUAGE_FILE
    data = read_yaml(file)
    entry = parse_dataclass(LanguageEntry, data, file)
    # Plain relative file names (``grammar.yaml``) are allowed for files inside the language folder.
    if entry.synthetic is not None and not is_local_source(entry.synthetic.grammar):
        entry = dataclasses.replace(entry, synthetic=dataclasses.replace(
            entry.synthetic, grammar="./" + entry.synthetic.grammar))
    if entry.detection.seed_words and not is_local_source(entry.detection.seed_words):
        entry = dataclasses.replace(entry, detection=dataclasses.replace(
            entry.detection, seed_words="./" + entry.detection.seed_words))
    if entry.benchmark.prompt_sets:
        entry = dataclasses.replace(entry, benchmark=dataclasses.replace(entry.benchmark, prompt_sets=tuple(
            p if is_local_source(p) else "./" + p for p in entry.benchmark.prompt_sets)))
    entry = dataclasses.replace(entry, folder=folder, file=file)
    _check_language(entry, file, code or folder.name)
    if word_lists:
        entry.seed_words  # noqa: B018 - reads and checks the list: a broken one fails here, not when routing
    return entry


def load_registry(path: str | Path | None = None) -> Registry:
    """Load ``registry.yaml`` and every language it lists; all or nothing.

    ``path`` may be the file or its folder; by default it is found via :func:`find_registry`.
    """
    file = find_registry(path)
    root = file.parent
    spec = parse_dataclass(RegistrySpec, read_yaml(file), file)
    if not spec.backbones:
        raise RegistryError(file, "backbones", "at least one backbone is required")
    backbones = {}
    for name, bb in spec.backbones.items():
        if bb.architecture not in catalog.ARCHITECTURES:
            raise RegistryError(file, f"backbones.{name}.architecture", f"unknown architecture {bb.architecture!r}"
                                f"{_suggest(bb.architecture, catalog.ARCHITECTURES)}", valid=catalog.ARCHITECTURES)
        _check_source(bb.source, file, f"backbones.{name}.source", must_exist=False)
        backbones[name] = dataclasses.replace(bb, name=name)
    if spec.default_backbone not in backbones:
        raise RegistryError(file, "default_backbone", f"{spec.default_backbone!r} is not a listed backbone{_suggest(spec.default_backbone, backbones)}",
                            valid=backbones)
    seen: dict[str, int] = {}
    for i, code in enumerate(spec.languages):
        if not CODE_PATTERN.match(code):
            raise RegistryError(file, f"languages[{i}]", f"{code!r} is not a language code (ISO 639, e.g. 'zh', 'pt-BR')")
        if code in seen:
            raise RegistryError(file, f"languages[{i}]", f"duplicate language code {code!r} (also languages[{seen[code]}])")
        seen[code] = i
    languages = {}
    for i, code in enumerate(spec.languages):
        folder = root / "languages" / code
        if not (folder / LANGUAGE_FILE).is_file():
            raise RegistryError(file, f"languages[{i}]", f"{code!r} has no {folder / LANGUAGE_FILE}; "
                                f"create it with `polybridge registry add {code}`")
        languages[code] = load_language(folder, code)
    # Cross-language checks.
    owners: dict[str, str] = {}
    for code, entry in languages.items():
        for concept in entry.synthetic.concepts if entry.synthetic else ():
            if concept in owners:
                raise RegistryError(entry.file, "synthetic.concepts",
                                    f"concept {concept!r} is already owned by {owners[concept]!r}")
            owners[concept] = code
    for name, bb in backbones.items():
        if bb.language not in languages:
            raise RegistryError(file, f"backbones.{name}.language", f"{bb.language!r} is not a registered language",
                                valid=languages)
        if not languages[bb.language].is_backbone_language:
            raise RegistryError(languages[bb.language].file, "encoder",
                                f"{bb.language!r} is the language of backbone {name!r}, so its entry has no encoder or branch")
    if spec.fallback_language not in languages:
        raise RegistryError(file, "fallback_language", f"{spec.fallback_language!r} is not a registered language",
                            valid=languages)
    if not 0.0 <= spec.detection_threshold <= 1.0:
        raise RegistryError(file, "detection_threshold", f"must be in [0, 1], got {spec.detection_threshold}")
    return Registry(
        root=root,
        file=file,
        backbones=types.MappingProxyType(backbones),
        default_backbone=spec.default_backbone,
        languages=types.MappingProxyType(languages),
        fallback_language=spec.fallback_language,
        detection_threshold=spec.detection_threshold,
    )


def find_registry(path: str | Path | None = None) -> Path:
    """Where ``registry.yaml`` is: the argument, then ``$POLYBRIDGE_REGISTRY``, then the current
    directory and its parents, then the checkout this package was installed from (editable install)."""
    if path is None and os.environ.get(REGISTRY_ENV):
        path = os.environ[REGISTRY_ENV]
    if path is not None:
        p = Path(path).expanduser()
        p = p / REGISTRY_FILE if p.is_dir() else p
        if not p.is_file():
            raise RegistryError(p, None, "registry file not found")
        return p.resolve()
    candidates = [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent]
    for folder in candidates:
        if (folder / REGISTRY_FILE).is_file():
            return (folder / REGISTRY_FILE).resolve()
    raise RegistryError(REGISTRY_FILE, None, "no registry.yaml in the current directory or its parents; "
                        f"pass --registry PATH or set ${REGISTRY_ENV}")
