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
import math
import os
import re
import reprlib
import stat
import types
import typing
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from polybridge import catalog, limits
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
#: What ``encoder.tokenizer_class`` may name besides ``auto``: a transformers tokenizer class, never a model class.
TOKENIZER_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*Tokenizer(Fast)?")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class RegistryError(PolyBridgeError, ValueError):
    """A registry file is wrong. The message names the file, the key and what would be valid."""

    def __init__(self, file: str | Path, key: str | None, problem: str, valid: typing.Iterable[str] | None = None):
        self.file = str(file)
        self.key = key
        problem = cut(problem)  # a value a user wrote may be huge: quote an excerpt
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
        full = base / Path(source).expanduser()
        if full.name in ("", ".", ".."):
            return full.resolve()
        return full.parent.resolve() / full.name  # a symlink stays a link: an output there replaces the link
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
    variant: str | None = None  # e.g. fp16: the weights files named ``*.fp16.safetensors``
    name: str = _derived("")


@dataclass(frozen=True)
class PluginSpec:
    """A plugin made for one of the registry's backbones, in a stock diffusers format (:mod:`polybridge.plugins`)."""

    kind: Literal["lora", "controlnet", "textual_inversion", "checkpoint", "ip_adapter"]
    source: str  # a folder, a file (.safetensors) or a hub id
    backbone: str | None = None  # the backbone it was made for (default: default_backbone)
    weight_name: str | None = None  # the weights file inside a folder source
    token: str | None = None  # textual_inversion: the token it adds
    scale: float = 1.0  # lora, ip_adapter: the adapter's weight
    variant: str | None = None  # checkpoint: e.g. fp16
    description: str = ""
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
    plugins: dict[str, PluginSpec] = field(default_factory=dict)


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
    plugins: Mapping[str, PluginSpec] = field(default_factory=lambda: types.MappingProxyType({}))

    def plugin(self, name: str, kind: str | None = None) -> PluginSpec:
        """The plugin ``name`` (of ``kind``, when given); unknown: a RegistryError listing those that would fit."""
        valid = [n for n, p in self.plugins.items() if kind is None or p.kind == kind]
        if name not in valid:
            what = f"{kind} plugin" if kind else "plugin"
            raise RegistryError(self.file, "plugins", f"unknown {what} {name!r}{_suggest(name, valid)}",
                                valid=valid or ["(none listed)"])
        return self.plugins[name]

    def plugin_source(self, name: str) -> Path | str:
        return resolve_source(self.plugins[name].source, self.root)

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
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {excerpt(key)} (first at line "
                                                    f"{seen[key].start_mark.line + 1})", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


#: The largest YAML data file (registry, language entry, grammar, prompt set) polybridge reads, in bytes; the
#: shipped ones are under 5 kB.
YAML_MAX_BYTES = 1 << 20
#: The most nodes a YAML file may hold once its aliases (``*name``) are expanded: a few kB of nested aliases
#: (a "billion laughs") would otherwise grow into gigabytes wherever the value is walked or printed.
YAML_MAX_NODES = 100_000
#: The most characters of a user's value an error message quotes.
EXCERPT_CHARS = 80


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the total length), for error messages about values a user
    wrote: a huge or self-similar value is never rendered whole."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 8, 8, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def cut(message: str, limit: int = 400) -> str:
    """``message`` on one line and at most ``limit`` characters (with the total length when cut)."""
    message = " ".join(message.split("\n"))
    return message if len(message) <= limit else message[:limit] + f"... ({len(message):,} characters)"


def _expanded_nodes(node: yaml.Node, limit: int) -> int:
    """How many nodes ``node`` stands for with every alias expanded, counting past ``limit`` only as far as needed;
    shared (aliased) nodes are measured once and multiplied, so a bomb is measured without being expanded."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if depth > 500:
            return limit + 1
        sizes[id(n)] = limit + 1  # a node that contains itself never ends
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for child in children:
            total += size(child, depth + 1)
            if total > limit:
                break
        sizes[id(n)] = min(total, limit + 1)
        return sizes[id(n)]

    return size(node, 0)


def read_yaml(path: Path, error: typing.Callable[[Path, str | None, str], Exception] = RegistryError,
              key: str | None = None) -> Any:
    """Parse one YAML file safely (a key written twice is refused); every failure is ``error(path, key,
    problem)`` naming the file (and line): a RegistryError, or the reader's own error class (the grammar
    passes GrammarError and the key ``(yaml)``). A file that is not a regular file (a device, a fifo), is over
    YAML_MAX_BYTES, or whose aliases expand to over YAML_MAX_NODES nodes is refused before it is read or
    expanded."""
    try:
        info = path.stat()
    except OSError:
        raise error(path, key, "file not found") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(path, key, "not a regular file (a device, fifo or folder cannot be read as YAML)")
    if info.st_size > YAML_MAX_BYTES:
        raise error(path, key, f"has {info.st_size:,} bytes; a YAML data file may have at most {YAML_MAX_BYTES:,}")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(YAML_MAX_BYTES + 1)
        if len(raw) > YAML_MAX_BYTES:
            raise error(path, key, f"has over {YAML_MAX_BYTES:,} bytes; a YAML data file may have at most that")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(path, key, f"cannot read: not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise error(path, key, f"cannot read: {exc.strerror or exc}") from None
    loader = None
    try:
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, YAML_MAX_NODES) > YAML_MAX_NODES:
            raise error(path, key, f"its aliases (*name) expand to over {YAML_MAX_NODES:,} values; "
                        "write the data out instead of nesting aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(path, key, f"not valid YAML: {where}{excerpt(problem, 200)}") from None
    except (TypeError, RecursionError) as exc:  # an unhashable or self-containing key the constructor trips on
        raise error(path, key, f"not valid data: {excerpt(str(exc), 200)} (keys must be plain strings)") from None
    finally:
        if loader is not None:
            loader.dispose()


# --------------------------------------------------------------------------- typed parsing


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
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
        raise RegistryError(file, key, f"expected {_type_name(tp)}, got {excerpt(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RegistryError(file, key, f"{excerpt(value)} is not allowed{_suggest(value, map(str, allowed))}",
                                valid=[str(a) for a in allowed])
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise RegistryError(file, key, f"expected {_type_name(tp)}, got {type(value).__name__} {excerpt(value)}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, file, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RegistryError(file, key, f"expected a mapping, got {type(value).__name__} {excerpt(value)}")
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, file, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, file, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise RegistryError(file, key, f"expected true or false, got {excerpt(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RegistryError(file, key, f"expected an integer, got {excerpt(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python reads as a number.
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    pass
                else:
                    if math.isfinite(number):
                        return number
            raise RegistryError(file, key, f"expected a number, got {excerpt(value)}")
        if not math.isfinite(value):
            raise RegistryError(file, key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RegistryError(file, key, f"expected a string, got {type(value).__name__} {excerpt(value)}")
        return value
    raise TypeError(f"registry field type {tp!r} is not supported")  # a bug in this module, not in the file


def parse_dataclass(cls: type, data: Any, file: Path, key: str = "") -> Any:
    """Build frozen dataclass ``cls`` from a YAML mapping, rejecting unknown keys and wrong types."""
    where = key or "(top level)"
    if not isinstance(data, dict):
        raise RegistryError(file, where, f"expected a mapping, got {type(data).__name__} {excerpt(data)}")
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
                                f"unknown encoder class {excerpt(enc.model_class)}"
                                f"{_suggest(enc.model_class, ENCODER_CLASSES)} (transformers has no such class)",
                                valid=ENCODER_CLASSES)
        if enc.tokenizer_class != "auto" and not TOKENIZER_CLASS.fullmatch(enc.tokenizer_class):
            raise RegistryError(file, "encoder.tokenizer_class", f"{excerpt(enc.tokenizer_class)} is not a tokenizer "
                                "class", valid=["auto", "a transformers tokenizer class (e.g. BertTokenizerFast, "
                                                "XLMRobertaTokenizer)"])
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
        _check_upper_bounds(br, file)
    if entry.data is not None and entry.data.num_samples is not None \
            and not 1 <= entry.data.num_samples <= limits.MAX_NUM_SAMPLES:
        raise RegistryError(file, "data.num_samples", f"must be from 1 to {limits.MAX_NUM_SAMPLES:,} (or null: all), "
                            f"got {entry.data.num_samples}")
    if entry.synthetic is not None:
        grammar = resolve_source(entry.synthetic.grammar, file.parent)
        if isinstance(grammar, Path) and grammar.exists() and not grammar.is_file():
            raise RegistryError(file, "synthetic.grammar", f"{grammar} is not a regular file (a grammar is a YAML "
                                "file)")
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


def _check_upper_bounds(br: BranchSpec, file: Path) -> None:
    """The branch's scale and training hyperparameters within polybridge's documented limits (README "Limits")."""
    bounds = {"scale": (0.0, limits.MAX_BRANCH_SCALE),
              "training.learning_rate": (0.0, limits.MAX_LEARNING_RATE),
              "training.batch_size": (1, limits.MAX_BATCH_SIZE),
              "training.max_steps": (1, limits.MAX_TRAIN_STEPS),
              "training.warmup_steps": (0, limits.MAX_TRAIN_STEPS),
              "training.checkpoint_every": (1, limits.MAX_TRAIN_STEPS),
              "training.gradient_accumulation_steps": (1, limits.MAX_BATCH_SIZE)}
    for key, (low, high) in bounds.items():
        value = getattr(br.training, key.split(".", 1)[1]) if "." in key else getattr(br, key)
        if not low <= value <= high:
            raise RegistryError(file, f"branch.{key}", f"must be from {low:g} to {high:g}, got {value!r}")


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
            if concept in owners:  # either file may be the one just edited: name both
                raise RegistryError(entry.file, "synthetic.concepts",
                                    f"concept {concept!r} is already owned by {owners[concept]!r} "
                                    f"({languages[owners[concept]].file}); a concept belongs to one language, so "
                                    "remove it from one of the two files")
            owners[concept] = code
    for name, bb in backbones.items():
        if bb.language not in languages:
            raise RegistryError(file, f"backbones.{name}.language", f"{bb.language!r} is not a registered language",
                                valid=languages)
        if not languages[bb.language].is_backbone_language:
            raise RegistryError(languages[bb.language].file, "encoder",
                                f"{bb.language!r} is the language of backbone {name!r}, so its entry has no encoder or branch")
    _check_synthetic_data(languages)
    if spec.fallback_language not in languages:
        raise RegistryError(file, "fallback_language", f"{spec.fallback_language!r} is not a registered language",
                            valid=languages)
    if not 0.0 <= spec.detection_threshold <= 1.0:
        raise RegistryError(file, "detection_threshold", f"must be in [0, 1], got {spec.detection_threshold}")
    plugins = {}
    for name, plugin in spec.plugins.items():
        _check_source(plugin.source, file, f"plugins.{name}.source", must_exist=False)
        if (plugin.backbone or spec.default_backbone) not in backbones:
            raise RegistryError(file, f"plugins.{name}.backbone", f"{plugin.backbone!r} is not a listed backbone",
                                valid=backbones)
        plugins[name] = dataclasses.replace(plugin, name=name, backbone=plugin.backbone or spec.default_backbone)
    return Registry(
        root=root,
        file=file,
        backbones=types.MappingProxyType(backbones),
        default_backbone=spec.default_backbone,
        languages=types.MappingProxyType(languages),
        fallback_language=spec.fallback_language,
        detection_threshold=spec.detection_threshold,
        plugins=types.MappingProxyType(plugins),
    )


#: The splits of the synthetic world (polybridge.synthetic.scenes.SPLITS).
SYNTHETIC_SPLITS = ("train", "validation", "test")


def _check_synthetic_data(languages: Mapping[str, LanguageEntry]) -> None:
    """What ``train`` needs of a ``dataset: synthetic`` entry, checked when the registry loads (so ``registry
    validate`` finds it): the caption columns name registered languages with grammars, the split exists."""
    for code, entry in languages.items():
        data = entry.data
        if data is None or data.dataset != "synthetic":
            continue
        expected = f"caption_{code}"
        if data.caption_column != expected:
            raise RegistryError(entry.file, "data.caption_column", f"synthetic data is captioned in the entry's own "
                                f"language, so the column is {expected!r}, not {excerpt(data.caption_column)}",
                                valid=[expected])
        others = [f"caption_{c}" for c, e in languages.items() if e.synthetic is not None and c != code]
        if data.english_column is not None and data.english_column not in others:
            raise RegistryError(entry.file, "data.english_column", f"{excerpt(data.english_column)} is not the caption "
                                "column of another registered language with a grammar", valid=others)
        if data.split not in SYNTHETIC_SPLITS:
            raise RegistryError(entry.file, "data.split", f"{excerpt(data.split)} is not a split of the synthetic "
                                "world", valid=SYNTHETIC_SPLITS)


def find_registry(path: str | Path | None = None) -> Path:
    """Where ``registry.yaml`` is: the argument, then ``$POLYBRIDGE_REGISTRY``, then the current
    directory and its parents, then the checkout this package was installed from (editable install)."""
    if path is None and os.environ.get(REGISTRY_ENV):
        path = os.environ[REGISTRY_ENV]
    if path is not None:
        p = Path(path).expanduser()
        p = p / REGISTRY_FILE if p.is_dir() else p
        if not p.is_file():
            raise RegistryError(p, None, "not a regular file" if p.exists() else "registry file not found")
        return p.resolve()
    candidates = [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent]
    for folder in candidates:
        if (folder / REGISTRY_FILE).is_file():
            return (folder / REGISTRY_FILE).resolve()
    raise RegistryError(REGISTRY_FILE, None, "no registry.yaml in the current directory or its parents; "
                        f"pass --registry PATH or set ${REGISTRY_ENV}")
