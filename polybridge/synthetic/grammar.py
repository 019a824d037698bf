"""Caption grammars: per-language data (``languages/<code>/grammar.yaml``) and the engine that reads it.

A grammar file has two parts, ``words`` and ``templates``; see ``languages/en/grammar.yaml`` for a
commented example and ``languages/de/grammar.yaml`` for agreement in gender and case.

``words`` maps categories to entries. The attribute categories name every id of the world:
``shape`` (each generic shape, each concept the language owns, and ``object`` for everything else),
``colour``, ``size``, ``position`` and ``background``. A category ``<attribute>_<form>`` (``colour_name``,
``background_is``, ...) is another complete set of words for the same attribute, for constructions that
need a different form. Every other category holds function words (articles, particles, numerals, ...):
``{num.one}`` in a template reads ``words.num.one``, ``{conj}`` reads ``words.conj`` itself.

An entry is a string, a list of synonyms (one is drawn per caption), or an agreement table: a mapping
from a feature value to an entry (tables nest, e.g. case, then gender). Which feature a table follows
is inferred from its keys (``{m: rojo, f: roja}`` follows ``gender``) or given with ``agree:``.
Features come from the head noun (``circle: {text: [círculo], gender: m}``, or a list of such
variants when synonyms differ), from templates (``features: {case: acc}``) and from ``options.defaults``.
Two built-in features follow the sound of the neighbouring text: ``agree: next`` (keys ``vowel`` and
``consonant``: English a/an, French de/d') and ``agree: prev`` (keys ``batchim`` and ``open``: the
Korean particles 이/가, 은/는, 과/와, chosen by the final syllable of whatever text precedes them).

``templates`` has ``object`` (one object: exactly one each of ``{shape}``, ``{colour}``, ``{size}``,
``{position}``), ``scene1`` (``{object}`` and ``{background}``) and ``scene2`` (``{object1}``,
``{object2}``, ``{background}``), each a list of at least three templates. A template is a string or a
mapping with ``text`` and optionally ``form`` (object templates: a label such as ``np`` for a noun phrase
or ``clause`` for a sentence; default ``np``), ``objects`` (scene templates: the object forms the frame
accepts; default all) and ``features`` (passed to agreement; a scene template's features reach its
objects, an object template's own features override them).

Everything is validated when the file is loaded, so captioning never fails: every id present, every
slot known, every agreement resolvable for every noun in every template that can reach it. Errors
(:class:`GrammarError`) name the file, the key path and what would be valid.
"""

from __future__ import annotations

import difflib
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polybridge.errors import PolyBridgeError, PolyBridgeValueError
from polybridge.registry import cut, read_yaml
from polybridge.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    DRAWABLE,
    POSITIONS,
    SHAPES,
    SIZES,
    UNNAMED_OBJECTS,
    Scene,
    SceneObject,
)

#: The generic noun every language uses for a concept it does not own (and for the unnamed objects).
OBJECT = "object"

#: Attribute categories and the ids each must cover (``shape`` also covers owned concepts and ``object``).
ATTRIBUTE_IDS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
OBJECT_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")
TEMPLATE_KINDS: tuple[str, ...] = ("object", "scene1", "scene2")
MIN_TEMPLATES = 3
DEFAULT_FORM = "np"

#: Built-in phonological features and the keys their tables must have.
PHONOLOGICAL: dict[str, tuple[str, ...]] = {"next": ("vowel", "consonant"), "prev": ("batchim", "open")}

_TOP_KEYS = ("language", "description", "options", "words", "templates")
_OPTION_KEYS = ("capitalize", "defaults")
_TEMPLATE_KEYS = {"object": ("text", "form", "features"), "scene1": ("text", "objects", "features"),
                  "scene2": ("text", "objects", "features")}
_SCENE_SLOTS = {"scene1": ("object",), "scene2": ("object1", "object2")}
_VOWELS = frozenset("aeiouAEIOUàáâäèéêëìíîïòóôöùúûüÀÁÂÄÈÉÊËÌÍÎÏÒÓÔÖÙÚÛÜ")
_SLOT = re.compile(r"\{([^{}]*)\}")
_SLOT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
#: Marks the boundary between two grammar words in :attr:`CaptionInfo.marked` (a private-use
#: character no grammar may contain). Tokenizer training splits on it so that no piece spans two
#: words: a colour is never fused with its noun, even in scripts written without spaces.
WORD_BOUNDARY = "\ue000"
_B = WORD_BOUNDARY
_SPACES = re.compile(f"[\\s{_B}]*\\s[\\s{_B}]*")          # any run with a space: one space, no boundary
_SPACE_BEFORE = re.compile(r" (?=[,.،؛।，。、；：！？）」』])")
_SPACE_AFTER = re.compile(r"(?<=[，。、；：！？（「『]) ")
_BOUNDARIES = re.compile(f"{_B}+")
# Bidi controls would make right-to-left text render differently from how it is stored.
_BIDI_CONTROLS = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class GrammarError(PolyBridgeError, ValueError):
    """A grammar file is unusable. ``path`` and ``key`` (a dotted key path) say where."""

    def __init__(self, path: str | Path, key: str, message: str):
        self.path, self.key = str(path), key
        message = cut(message)  # a value a user wrote may be huge: quote an excerpt
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


def _did_you_mean(name: str, valid: Iterable[str]) -> str:
    valid = sorted(set(valid))
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid: {', '.join(valid) if valid else '(none)'}"


# --------------------------------------------------------------------------- compiled data


class _Text:
    """Synonyms: one is drawn per use."""

    __slots__ = ("options",)

    def __init__(self, options: tuple[str, ...]):
        self.options = options


class _Table:
    """An agreement table: ``cases[ctx[feature]]``; ``feature`` may be ``next``/``prev`` (sound of the neighbours)."""

    __slots__ = ("feature", "cases", "key")

    def __init__(self, feature: str | None, cases: dict[str, Any], key: str):
        self.feature, self.cases, self.key = feature, cases, key


@dataclass(frozen=True)
class _Noun:
    texts: tuple[str, ...]
    features: Mapping[str, str]
    key: str


@dataclass(frozen=True)
class _Slot:
    kind: str                 # "shape", "attr", "word", "object"
    name: str                 # slot text, e.g. "colour_name", "num.one", "object2"
    attribute: str = ""       # for "attr": shape/colour/size/position/background
    entries: Any = None       # "attr": {id: entry}; "word": entry; "object": index of the object


@dataclass(frozen=True)
class _Template:
    kind: str
    index: int
    text: str
    parts: tuple[Any, ...]    # str literals and _Slot
    form: str
    accepts: frozenset[str] | None
    features: Mapping[str, str]

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.index}]"


@dataclass(frozen=True)
class CaptionInfo:
    """A caption and the templates that produced it (``scene2[1]``, ``object[0]``, ``object[4]``)."""

    text: str
    templates: tuple[str, ...]
    #: ``text`` with :data:`WORD_BOUNDARY` between adjacent grammar words that no space separates.
    marked: str = ""


# --------------------------------------------------------------------------- the grammar


@dataclass(frozen=True)
class Grammar:
    """One language's caption grammar, validated. Build with :func:`load_grammar`."""

    code: str
    path: Path
    concepts: tuple[str, ...] = ()
    capitalize: bool = False
    _defaults: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    _nouns: Mapping[str, tuple[_Noun, ...]] = field(default_factory=dict, repr=False, compare=False)
    _attributes: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict, repr=False, compare=False)
    _templates: Mapping[str, tuple[_Template, ...]] = field(default_factory=dict, repr=False, compare=False)

    # ---- public API

    def caption(self, scene: Scene, rng: random.Random) -> str:
        """A caption of ``scene`` (one or two objects) drawn with ``rng``; deterministic given its state."""
        return self.caption_info(scene, rng).text

    def caption_info(self, scene: Scene, rng: random.Random) -> CaptionInfo:
        """Like :meth:`caption`, also naming the templates used (same draws, same text)."""
        return _render_scene(scene, [self] * len(scene.objects), rng, self.path)

    def describe_object(self, obj: SceneObject, rng: random.Random) -> str:
        """One object alone (shape or "object", colour, size, position), with any object template."""
        _check_object(obj)
        text, _ = self._render_object(obj, rng, self._templates["object"], {})
        return _finish(text, False).replace(_B, "")

    def surface_forms(self, attribute: str, key: str) -> frozenset[str]:
        """Every string this grammar may write for ``attribute`` ``key`` (all synonyms, forms, variants).

        For ``shape``, a concept the language does not own gives the forms of ``object``.
        """
        if attribute == "shape":
            return frozenset(t for n in self._nouns[self.noun_key(key)] for t in n.texts)
        if attribute not in self._attributes:
            raise KeyError(f"{attribute!r} is not an attribute; valid: {', '.join(ATTRIBUTE_IDS)}")
        out: set[str] = set()
        for entries in self._attributes[attribute].values():
            out.update(_all_texts(entries[key]))
        return frozenset(s for s in out if s.strip())

    def texts(self) -> frozenset[str]:
        """Every piece of text this grammar may write: each noun, attribute form and function word (every synonym,
        agreement form and variant) and the words its templates write themselves (the router's seed words are
        made from them, see ``scripts/build_seed_words.py``)."""
        out = {t for nouns in self._nouns.values() for n in nouns for t in n.texts}
        for categories in self._attributes.values():
            for entries in categories.values():
                for entry in entries.values():
                    out |= _all_texts(entry)
        for templates in self._templates.values():
            for template in templates:
                for part in template.parts:
                    if part.__class__ is str:
                        out.add(part)
                    elif part.kind == "word":
                        out |= _all_texts(part.entries)
        return frozenset(t for t in out if t.strip())

    def noun_key(self, shape: str) -> str:
        """The ``words.shape`` key used for ``shape``: itself if named by this language, else ``object``."""
        return shape if shape in self._nouns else OBJECT

    @property
    def template_names(self) -> tuple[str, ...]:
        return tuple(t.name for kind in TEMPLATE_KINDS for t in self._templates[kind])

    # ---- rendering

    def _object_templates(self, accepts: frozenset[str] | None) -> tuple[_Template, ...]:
        templates = self._templates["object"]
        if accepts is None:
            return templates
        chosen = tuple(t for t in templates if t.form in accepts)
        return chosen or templates  # another language's frame may accept no form of ours: use them all

    def _render_object(self, obj: SceneObject, rng: random.Random, templates: Sequence[_Template],
                       scene_features: Mapping[str, str]) -> tuple[str, str]:
        template = templates[rng.randrange(len(templates))] if len(templates) > 1 else templates[0]
        nouns = self._nouns[self.noun_key(obj.shape)]
        noun = nouns[rng.randrange(len(nouns))] if len(nouns) > 1 else nouns[0]
        ctx = {**self._defaults, **scene_features, **template.features, **noun.features}
        pieces: list[str | None] = []
        pending: list[tuple[int, _Table]] = []
        for part in template.parts:
            if part.__class__ is str:
                pieces.append(part)
            elif part.kind == "shape":
                pieces.append(_pick(noun.texts, rng))
            elif part.kind == "attr":
                _resolve(part.entries[getattr(obj, part.attribute)], ctx, rng, pieces, pending)
            else:
                _resolve(part.entries, ctx, rng, pieces, pending)
        if pending:
            _resolve_sounds(pieces, pending, rng)
        return _B.join(p for p in pieces if p), template.name  # type: ignore[misc]


def _render_scene(scene: Scene, grammars: Sequence[Grammar], rng: random.Random, path: Path) -> CaptionInfo:
    n = len(scene.objects)
    if n not in (1, 2):
        raise PolyBridgeValueError(f"a scene to caption has 1 or 2 objects, this one has {n}")
    if len(grammars) != n:
        raise PolyBridgeValueError(f"need one grammar per object ({n}), got {len(grammars)}")
    if scene.background not in BACKGROUNDS:
        raise PolyBridgeValueError(f"background {scene.background!r} is not in the world{_did_you_mean(scene.background, BACKGROUNDS)}")
    for obj in scene.objects:
        _check_object(obj)
    frame = grammars[0]
    templates = frame._templates["scene1" if n == 1 else "scene2"]
    template = templates[rng.randrange(len(templates))]
    ctx = {**frame._defaults, **template.features}
    used = [template.name]
    pieces: list[str | None] = []
    pending: list[tuple[int, _Table]] = []
    first_grammar: Grammar | None = None
    for part in template.parts:
        if part.__class__ is str:
            pieces.append(part)
            if first_grammar is None and part.strip():
                first_grammar = frame
            continue
        if part.kind == "object":
            g = grammars[part.entries]
            own = g is frame
            text, name = g._render_object(scene.objects[part.entries], rng, g._object_templates(template.accepts),
                                          template.features if own else {})
            used.append(name if own else f"{g.code}:{name}")
            pieces.append(text)
            if first_grammar is None and text.strip():
                first_grammar = g
            continue
        if part.kind == "attr":
            _resolve(part.entries[scene.background], ctx, rng, pieces, pending)
        else:
            _resolve(part.entries, ctx, rng, pieces, pending)
        if first_grammar is None:
            first_grammar = frame
    if pending:
        _resolve_sounds(pieces, pending, rng)
    marked = _finish(_B.join(p for p in pieces if p), (first_grammar or frame).capitalize)  # type: ignore[misc]
    return CaptionInfo(marked.replace(_B, ""), tuple(used), marked)


_VALID = {"shape": frozenset(DRAWABLE), "colour": frozenset(COLOURS), "size": frozenset(SIZES),
          "position": frozenset(POSITIONS)}


def _check_object(obj: SceneObject) -> None:
    for attribute, valid in _VALID.items():
        value = getattr(obj, attribute)
        if value not in valid:
            raise PolyBridgeValueError(f"{attribute} {value!r} is not in the world{_did_you_mean(value, valid)}")


def caption_mixed(scene: Scene, grammars: Sequence[Grammar], rng: random.Random) -> str:
    """A caption with object ``i`` in ``grammars[i]``; ``grammars[0]`` gives the frame and background.

    Each object is named the way its own language names it (a concept only its owner names). The
    frame's accepted object forms pick the object templates of every language where that language has
    such a form.
    """
    return caption_mixed_info(scene, grammars, rng).text


def caption_mixed_info(scene: Scene, grammars: Sequence[Grammar], rng: random.Random) -> CaptionInfo:
    """:func:`caption_mixed`, also naming the templates used (another language's as ``code:object[i]``)."""
    if not grammars:
        raise PolyBridgeValueError("caption_mixed needs at least one grammar")
    return _render_scene(scene, list(grammars), rng, grammars[0].path)


def _pick(options: tuple[str, ...], rng: random.Random) -> str:
    return options[rng.randrange(len(options))] if len(options) > 1 else options[0]


def _resolve(entry: Any, ctx: Mapping[str, str], rng: random.Random, pieces: list, pending: list) -> None:
    while entry.__class__ is _Table:
        if entry.feature in PHONOLOGICAL:
            pending.append((len(pieces), entry))
            pieces.append(None)
            return
        entry = entry.cases[ctx[entry.feature]]
    pieces.append(_pick(entry.options, rng))


def _resolve_sounds(pieces: list, pending: list[tuple[int, _Table]], rng: random.Random) -> None:
    """Fill next-agreement slots (right to left), then prev-agreement slots (left to right)."""
    for index, table in reversed(pending):
        if table.feature == "next":
            following = "".join(p for p in pieces[index + 1:] if p is not None).replace(_B, "").lstrip()
            key = "vowel" if following[:1] in _VOWELS else "consonant"
            pieces[index] = _pick(table.cases[key].options, rng)
    for index, table in pending:
        if table.feature == "prev":
            before = "".join(p for p in pieces[:index] if p is not None).replace(_B, "").rstrip()
            pieces[index] = _pick(table.cases[_final_sound(before)].options, rng)


def _final_sound(text: str) -> str:
    """``batchim`` if ``text`` ends in a closed Hangul syllable (or a consonant letter), else ``open``."""
    if not text:
        return "open"
    last = text[-1]
    if "\uac00" <= last <= "\ud7a3":
        return "batchim" if (ord(last) - 0xAC00) % 28 else "open"
    return "batchim" if last.isalpha() and last not in _VOWELS else "open"


def _finish(text: str, capitalize: bool) -> str:
    """Normalise whitespace (one space, none at the ends, none around CJK punctuation); keep boundaries."""
    text = _BOUNDARIES.sub(_B, _SPACES.sub(" ", text)).strip(" " + _B)
    text = _SPACE_AFTER.sub("", _SPACE_BEFORE.sub("", text))
    if capitalize and text[:1].islower():
        text = text[0].upper() + text[1:]
    return text


def _all_texts(entry: Any) -> set[str]:
    if entry.__class__ is _Table:
        out: set[str] = set()
        for case in entry.cases.values():
            out |= _all_texts(case)
        return out
    return set(entry.options)


# --------------------------------------------------------------------------- loading


def _looks_like_table(value: dict) -> bool:
    """A function-word category given as one agreement table ({agree: prev, ...}) rather than keyed entries."""
    return "agree" in value


def grammar_concepts(path: str | Path) -> tuple[str, ...]:
    """The concept ids a grammar file names under ``words.shape`` (in world order), without validating it.

    For tools that have a grammar but no registry entry; the registry (``synthetic.concepts``) is the
    authority and :func:`load_grammar` checks that the two agree.
    """
    data = read_yaml(Path(path), GrammarError, "(yaml)")
    shapes = ((data.get("words") or {}).get("shape") or {}) if isinstance(data, dict) else {}
    return tuple(c for c in CONCEPTS if isinstance(shapes, dict) and c in shapes)


def load_grammar(path: str | Path, code: str, concepts: Sequence[str]) -> Grammar:
    """Read and fully validate ``path``, the grammar of language ``code`` owning ``concepts``."""
    return _Builder(Path(path), code, concepts).build()


class _Builder:
    def __init__(self, path: Path, code: str, concepts: Sequence[str]):
        self.path, self.code = path, code
        if isinstance(concepts, str):
            concepts = [concepts]
        for c in concepts:
            if c not in CONCEPTS:
                self.fail("concepts", f"unknown concept {c!r}{_did_you_mean(c, CONCEPTS)}")
        if len(set(concepts)) != len(concepts):
            self.fail("concepts", f"a concept is listed twice: {list(concepts)}")
        self.concepts = tuple(c for c in CONCEPTS if c in set(concepts))
        self.feature_values: dict[str, set[str]] = {}
        self.tables: list[_Table] = []

    def fail(self, key: str, message: str):
        raise GrammarError(self.path, key, message)

    # ---- top level

    def build(self) -> Grammar:
        data = read_yaml(self.path, GrammarError, "(yaml)")  # the registry's strict loader
        if not isinstance(data, dict):
            self.fail("", f"expected a mapping with keys words and templates, got {type(data).__name__}")
        self.check_keys(data, "", _TOP_KEYS, required=("words", "templates"))
        if "language" in data and data["language"] != self.code:
            self.fail("language", f"this grammar says {data['language']!r} but is loaded for language {self.code!r}")
        capitalize, defaults = self.options(data.get("options") or {})
        words = data["words"]
        if not isinstance(words, dict):
            self.fail("words", "expected a mapping of categories")
        self.check_string_keys(words, "words")
        nouns = self.nouns(words)
        attributes, functions = self.categories(words)
        templates = self.templates(data["templates"], words, attributes)
        for name, value in defaults.items():
            self.feature_values.setdefault(name, set()).add(value)
        self.infer_features()
        grammar = Grammar(code=self.code, path=self.path, concepts=self.concepts, capitalize=capitalize,
                          _defaults=defaults, _nouns=nouns, _attributes=attributes, _templates=templates)
        self.check_agreement(grammar)
        return grammar

    def options(self, options: Any) -> tuple[bool, dict[str, str]]:
        if not isinstance(options, dict):
            self.fail("options", "expected a mapping")
        self.check_keys(options, "options", _OPTION_KEYS)
        capitalize = options.get("capitalize", False)
        if not isinstance(capitalize, bool):
            self.fail("options.capitalize", f"expected true or false, got {capitalize!r}")
        defaults = self.features(options.get("defaults") or {}, "options.defaults")
        return capitalize, defaults

    def check_keys(self, data: dict, where: str, valid: Sequence[str], required: Sequence[str] = ()) -> None:
        self.check_string_keys(data, where)
        for key in data:
            if key not in valid:
                self.fail(f"{where}.{key}" if where else key, f"unknown key{_did_you_mean(key, valid)}")
        for key in required:
            if key not in data:
                self.fail(f"{where}.{key}" if where else key, "missing (required)")

    def check_string_keys(self, data: dict, where: str) -> None:
        for key in data:
            if not isinstance(key, str):
                hint = " (YAML reads yes/no/on/off/true/false as booleans: quote the key)" if isinstance(key, bool) else ""
                self.fail(f"{where}.{key}", f"keys must be strings, got {type(key).__name__} {key!r}{hint}")

    def features(self, data: Any, where: str) -> dict[str, str]:
        if not isinstance(data, dict):
            self.fail(where, f"expected a mapping of feature: value, got {data!r}")
        self.check_string_keys(data, where)
        out = {}
        for name, value in data.items():
            if name in PHONOLOGICAL or name in ("text", "agree"):
                self.fail(f"{where}.{name}", f"{name!r} is reserved and cannot be a feature name")
            if not isinstance(value, str):
                self.fail(f"{where}.{name}", f"a feature value must be a string, got {value!r}"
                          + (" (quote it: YAML reads yes/no/on/off as booleans)" if isinstance(value, bool) else ""))
            out[name] = value
        return out

    # ---- words

    def text(self, value: Any, where: str) -> _Text:
        if isinstance(value, str):
            options = (value,)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            options = tuple(value)
        else:
            self.fail(where, f"expected a string or a non-empty list of strings, got {value!r}")
        if not any(o.strip() for o in options):
            self.fail(where, "every synonym is empty; give at least one word")
        for option in options:
            for ch in option:
                if ch in _BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Co"):
                    self.fail(where, f"{option!r} contains the control or private-use character U+{ord(ch):04X}; "
                              "write plain text (right-to-left scripts need no direction marks)")
        return _Text(options)

    def entry(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            return self.text(value, where)
        self.check_string_keys(value, where)
        cases = {k: v for k, v in value.items() if k != "agree"}
        if "text" in cases:
            self.fail(where, "'text:' belongs to nouns (words.shape); an agreement table maps feature values to words")
        if not cases:
            self.fail(where, "empty agreement table")
        feature = value.get("agree")
        if feature is not None and not isinstance(feature, str):
            self.fail(f"{where}.agree", f"expected a feature name, got {feature!r}")
        table = _Table(feature, {k: self.entry(v, f"{where}.{k}") for k, v in cases.items()}, where)
        if feature in PHONOLOGICAL:
            wanted = PHONOLOGICAL[feature]
            for k in cases:
                if k not in wanted:
                    self.fail(f"{where}.{k}", f"agree: {feature} tables have the keys {', '.join(wanted)}"
                              f"{_did_you_mean(k, wanted)}")
            for k in wanted:
                if k not in cases:
                    self.fail(f"{where}.{k}", f"missing: agree: {feature} tables need both {' and '.join(wanted)}")
            for k, case in table.cases.items():
                if case.__class__ is _Table:
                    self.fail(f"{where}.{k}", f"the cases of an agree: {feature} table must be words, not tables")
        self.tables.append(table)
        return table

    def nouns(self, words: dict) -> dict[str, tuple[_Noun, ...]]:
        if "shape" not in words:
            self.fail("words.shape", "missing (required): one noun per generic shape, owned concept and 'object'")
        shapes = words["shape"]
        if not isinstance(shapes, dict):
            self.fail("words.shape", "expected a mapping from shape id to noun")
        self.check_string_keys(shapes, "words.shape")
        required = (*SHAPES, *self.concepts, OBJECT)
        for key in shapes:
            if key in UNNAMED_OBJECTS:
                self.fail(f"words.shape.{key}", f"{key!r} is an object no language names (world.UNNAMED_OBJECTS: "
                          "a plugin such as a Textual Inversion embedding teaches its word); remove it")
            if key in CONCEPTS and key not in self.concepts:
                self.fail(f"words.shape.{key}", f"{key!r} is a concept this language does not own "
                          f"(owned: {', '.join(self.concepts) or 'none'}); other languages' concepts are "
                          "described with 'object'. Remove it, or list it in synthetic.concepts")
            if key not in required:
                self.fail(f"words.shape.{key}", f"unknown shape{_did_you_mean(key, required)}")
        for key in required:
            if key not in shapes:
                self.fail(f"words.shape.{key}", f"missing: every generic shape, owned concept and 'object' needs a noun "
                          f"(needed: {', '.join(required)})")
        nouns = {}
        for key in required:
            value, where = shapes[key], f"words.shape.{key}"
            variants = value if isinstance(value, list) and any(isinstance(v, dict) for v in value) else [value]
            nouns[key] = tuple(self.noun(v, f"{where}[{i}]" if len(variants) > 1 else where)
                               for i, v in enumerate(variants))
        return nouns

    def noun(self, value: Any, where: str) -> _Noun:
        if not isinstance(value, dict):
            return _Noun(self.text(value, where).options, {}, where)
        self.check_string_keys(value, where)
        if "text" not in value:
            self.fail(f"{where}.text", "missing: a noun is {text: [...], <feature>: <value>, ...}")
        features = self.features({k: v for k, v in value.items() if k != "text"}, where)
        for name, v in features.items():
            self.feature_values.setdefault(name, set()).add(v)
        return _Noun(self.text(value["text"], f"{where}.text").options, features, where)

    def categories(self, words: dict) -> tuple[dict, dict]:
        attributes: dict[str, dict[str, dict[str, Any]]] = {a: {} for a in ATTRIBUTE_IDS if a != "shape"}
        functions: dict[str, Any] = {}
        for name, value in words.items():
            if name == "shape":
                continue
            attribute = self.attribute_of(name)
            if attribute == "shape":
                self.fail(f"words.{name}", "shape has no variant categories; give noun variants under words.shape")
            if attribute is None:
                functions[name] = value
                continue
            ids = ATTRIBUTE_IDS[attribute]
            if not isinstance(value, dict):
                self.fail(f"words.{name}", f"expected a mapping with one entry per {attribute} ({', '.join(ids)})")
            self.check_string_keys(value, f"words.{name}")
            for key in value:
                if key not in ids:
                    self.fail(f"words.{name}.{key}", f"unknown {attribute}{_did_you_mean(key, ids)}")
            for key in ids:
                if key not in value:
                    self.fail(f"words.{name}.{key}", f"missing: words.{name} needs every {attribute} "
                              f"({', '.join(ids)})")
            attributes[attribute][name] = {key: self.entry(value[key], f"words.{name}.{key}") for key in ids}
        for attribute in attributes:
            if attribute not in attributes[attribute]:
                self.fail(f"words.{attribute}", f"missing (required): one entry per {attribute} "
                          f"({', '.join(ATTRIBUTE_IDS[attribute])})")
        self.functions = functions
        self.function_cache: dict[str, Any] = {}
        return attributes, functions

    @staticmethod
    def attribute_of(category: str) -> str | None:
        for attribute in ATTRIBUTE_IDS:
            if category == attribute or category.startswith(attribute + "_"):
                return attribute
        return None

    def function_slots(self) -> list[str]:
        """Every function-word slot a template may use: {cat} for single entries, {cat.key} for keyed ones."""
        out = []
        for category, value in self.functions.items():
            out.append(category)
            if isinstance(value, dict) and not _looks_like_table(value):
                out.extend(f"{category}.{key}" for key in value)
        return out

    def function_word(self, name: str, where: str, valid: Sequence[str]) -> Any:
        if name in self.function_cache:
            return self.function_cache[name]
        category, _, key = name.partition(".")
        if category not in self.functions:
            self.fail(where, f"unknown slot {{{name}}}{_did_you_mean(name, valid)}")
        value = self.functions[category]
        if key:
            if not isinstance(value, dict):
                self.fail(where, f"slot {{{name}}}: words.{category} is a single entry; write {{{category}}}")
            self.check_string_keys(value, f"words.{category}")
            if key not in value:
                self.fail(where, f"slot {{{name}}}: words.{category} has no key {key!r}"
                          f"{_did_you_mean(key, [str(k) for k in value])}")
            entry = self.entry(value[key], f"words.{category}.{key}")
        else:
            entry = self.entry(value, f"words.{category}")
        self.function_cache[name] = entry
        return entry

    # ---- templates

    def templates(self, data: Any, words: dict, attributes: dict) -> dict[str, tuple[_Template, ...]]:
        if not isinstance(data, dict):
            self.fail("templates", f"expected a mapping with {', '.join(TEMPLATE_KINDS)}")
        self.check_keys(data, "templates", TEMPLATE_KINDS, required=TEMPLATE_KINDS)
        out: dict[str, tuple[_Template, ...]] = {}
        for kind in TEMPLATE_KINDS:
            items = data[kind]
            if not isinstance(items, list):
                self.fail(f"templates.{kind}", "expected a list of templates")
            if len(items) < MIN_TEMPLATES:
                self.fail(f"templates.{kind}", f"has {len(items)} template(s); give at least {MIN_TEMPLATES}, "
                          "with different word orders, so that an encoder learns the language and not one pattern")
            out[kind] = tuple(self.template(kind, i, item, attributes) for i, item in enumerate(items))
        forms = {t.form for t in out["object"]}
        for kind in ("scene1", "scene2"):
            for t in out[kind]:
                for form in sorted(t.accepts or ()):
                    if form not in forms:
                        self.fail(f"templates.{kind}[{t.index}].objects",
                                  f"no object template has form {form!r}{_did_you_mean(form, forms)}")
        return out

    def template(self, kind: str, index: int, item: Any, attributes: dict) -> _Template:
        where = f"templates.{kind}[{index}]"
        form, accepts, features = DEFAULT_FORM, None, {}
        if isinstance(item, dict):
            self.check_keys(item, where, _TEMPLATE_KEYS[kind], required=("text",))
            text = item["text"]
            if "form" in item:
                form = item["form"]
                if not isinstance(form, str) or not form:
                    self.fail(f"{where}.form", f"expected a form label such as np or clause, got {form!r}")
            if "objects" in item:
                objects = item["objects"]
                if isinstance(objects, str):
                    objects = [objects]
                if not isinstance(objects, list) or not objects or not all(isinstance(o, str) for o in objects):
                    self.fail(f"{where}.objects", f"expected a list of object forms, got {objects!r}")
                accepts = frozenset(objects)
            if "features" in item:
                features = self.features(item["features"], f"{where}.features")
                for name, value in features.items():
                    self.feature_values.setdefault(name, set()).add(value)
        else:
            text = item
        if not isinstance(text, str) or not text.strip():
            self.fail(where, f"expected template text (a string), got {text!r}")
        parts: list[Any] = []
        counts: dict[str, int] = {}
        pos = 0
        for m in _SLOT.finditer(text):
            literal = text[pos:m.start()]
            if "{" in literal or "}" in literal:
                self.fail(where, f"unbalanced brace in {text!r}")
            if literal:
                parts.append(literal)
            parts.append(self.slot(kind, m.group(1).strip(), where, attributes, counts))
            pos = m.end()
        tail = text[pos:]
        if "{" in tail or "}" in tail:
            self.fail(where, f"unbalanced brace in {text!r}")
        if tail:
            parts.append(tail)
        required = OBJECT_ATTRIBUTES if kind == "object" else (*_SCENE_SLOTS[kind], "background")
        for name in required:
            n = counts.get(name, 0)
            if n != 1:
                what = "missing" if n == 0 else f"used {n} times"
                self.fail(where, f"{{{name}}} is {what}: a {kind} template states it exactly once ({text!r})")
        for i, part in enumerate(parts):
            if isinstance(part, _Slot) and part.kind in ("word", "attr"):
                for feature in self.sound_features(part):
                    if feature == "prev" and not "".join(p if isinstance(p, str) else "x" for p in parts[:i]).strip():
                        self.fail(where, f"{{{part.name}}} agrees with the preceding text, but nothing precedes it")
                    if feature == "next" and not "".join(p if isinstance(p, str) else "x" for p in parts[i + 1:]).strip():
                        self.fail(where, f"{{{part.name}}} agrees with the following text, but nothing follows it")
        return _Template(kind, index, text, tuple(parts), form, accepts, features)

    def slot(self, kind: str, name: str, where: str, attributes: dict, counts: dict) -> _Slot:
        if not _SLOT_NAME.match(name):
            self.fail(where, f"bad slot {{{name}}}: write {{category}} or {{category.key}}")
        allowed_attrs = OBJECT_ATTRIBUTES if kind == "object" else ("background",)
        objects = () if kind == "object" else _SCENE_SLOTS[kind]
        valid = [*objects, *(c for a in allowed_attrs for c in ([a] if a == "shape" else attributes[a])),
                 *self.function_slots()]
        if name in objects:
            counts[name] = counts.get(name, 0) + 1
            return _Slot("object", name, entries=objects.index(name))
        attribute = self.attribute_of(name.partition(".")[0])
        if attribute is not None or name in ("object", "object1", "object2"):
            if attribute not in allowed_attrs or "." in name:
                self.fail(where, f"slot {{{name}}} is not allowed in {kind} templates"
                          f"{_did_you_mean(name, valid)}")
            counts[attribute] = counts.get(attribute, 0) + 1
            if attribute == "shape":
                if name != "shape":
                    self.fail(where, f"unknown slot {{{name}}}; the noun slot is {{shape}}")
                return _Slot("shape", name, attribute="shape")
            if name not in attributes[attribute]:
                self.fail(where, f"unknown slot {{{name}}}{_did_you_mean(name, valid)}")
            return _Slot("attr", name, attribute=attribute, entries=attributes[attribute][name])
        return _Slot("word", name, entries=self.function_word(name, where, valid))

    @staticmethod
    def sound_features(slot: _Slot) -> set[str]:
        found: set[str] = set()
        stack = list(slot.entries.values()) if slot.kind == "attr" else [slot.entries]
        while stack:
            e = stack.pop()
            if e.__class__ is _Table:
                if e.feature in PHONOLOGICAL:
                    found.add(e.feature)
                stack.extend(e.cases.values())
        return found

    # ---- agreement

    def infer_features(self) -> None:
        values = self.feature_values
        for table in self.tables:
            keys = set(table.cases)
            if table.feature is not None:
                if table.feature not in PHONOLOGICAL and table.feature not in values:
                    self.fail(f"{table.key}.agree", f"unknown feature {table.feature!r}"
                              f"{_did_you_mean(table.feature, [*values, *PHONOLOGICAL])}")
                continue
            candidates = [f for f, vals in values.items() if keys <= vals]
            if len(candidates) == 1:
                table.feature = candidates[0]
            elif not candidates:
                known = "; ".join(f"{f}: {', '.join(sorted(v))}" for f, v in sorted(values.items())) or "none"
                self.fail(table.key, f"cannot tell which feature this table agrees with: its keys "
                          f"({', '.join(sorted(keys))}) are not all values of one feature (features: {known}). "
                          "Fix the keys, give nouns the feature, or add agree: <feature>")
            else:
                self.fail(table.key, f"keys ({', '.join(sorted(keys))}) fit several features "
                          f"({', '.join(sorted(candidates))}); add agree: <feature>")

    def check_agreement(self, grammar: Grammar) -> None:
        """Resolve every table for every noun in every context a template can be rendered in."""
        defaults = dict(grammar._defaults)
        object_templates = grammar._templates["object"]
        contexts: dict[int, list[tuple[dict, str]]] = {t.index: [(defaults, "")] for t in object_templates}
        for kind in ("scene1", "scene2"):
            for scene in grammar._templates[kind]:
                ctx = {**defaults, **scene.features}
                self.check_parts(scene, ctx, None, f" (in {scene.name})")
                for t in grammar._object_templates(scene.accepts):
                    if scene.features:
                        contexts[t.index].append((scene.features, f", inside {scene.name}"))
        for t in object_templates:
            for scene_features, how in contexts[t.index]:
                for key, nouns in grammar._nouns.items():
                    for noun in nouns:
                        clash = set(noun.features) & set(t.features)
                        if clash:
                            self.fail(f"templates.object[{t.index}].features",
                                      f"feature {sorted(clash)[0]!r} is also a noun feature ({noun.key})")
                        ctx = {**defaults, **scene_features, **t.features, **noun.features}
                        self.check_parts(t, ctx, noun, f" (noun {noun.key} {noun.texts[0]!r} in {t.name}{how})")

    def check_parts(self, template: _Template, ctx: Mapping[str, str], noun: _Noun | None, context: str) -> None:
        for part in template.parts:
            if not isinstance(part, _Slot):
                continue
            if part.kind == "attr":
                for entry in part.entries.values():
                    self.check_entry(entry, ctx, context)
            elif part.kind == "word":
                self.check_entry(part.entries, ctx, context)

    def check_entry(self, entry: Any, ctx: Mapping[str, str], context: str) -> None:
        while entry.__class__ is _Table:
            if entry.feature in PHONOLOGICAL:
                return
            value = ctx.get(entry.feature)
            if value is None:
                self.fail(entry.key, f"agrees in {entry.feature!r}, which is not set{context}; give the noun "
                          f"a {entry.feature!r} feature or set it in options.defaults / the template's features")
            if value not in entry.cases:
                self.fail(entry.key, f"has no form for {entry.feature}={value!r}{context}; "
                          f"it has: {', '.join(sorted(entry.cases))}")
            entry = entry.cases[value]
