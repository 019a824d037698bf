"""The router: which registered language each part of a prompt is in, and where each part goes.

:meth:`Router.plan` turns a prompt into a :class:`RoutePlan`: its language **spans**, each with a
language, a confidence, how that was decided, and a target: the backbone's text encoder (English,
and whatever falls back to it) or a language's branch. Only registered languages are ever returned.

Detection, in two stages
------------------------
1. **Unicode scripts**, from each registry entry's ``scripts`` and the code-point table in
   :mod:`polybridge.unicode_scripts`. The prompt is cut into runs of one script; digits, punctuation,
   spaces, emoji, number tags such as ``4k``, ``1080p`` or ``85mm`` and short capitals such as ``CG`` or
   ``HDR`` belong to no script. Neighbouring runs join one group as long as some registered language
   writes all their scripts, so ``桜の木`` (Han + Hiragana) is one group, and ``a city with 灯笼`` is a
   Latin group and a Han group.

   - Scripts only one registered language writes decide at once (kana: ja, Hangul: ko, Cyrillic: ru,
     Arabic: ar, Devanagari: hi), confidence 1.0, ``how="script"``.
   - Scripts several languages write, some of which also write other scripts (Han: zh, ja and ko): if a
     script of one of them alone appears elsewhere in the prompt, that language (Han in a prompt with
     kana is ja; the nearest, if several), confidence 0.9, ``how="script+context"``; else the language
     written in the fewest scripts (Han alone is zh), confidence 0.8, ``how="script+fewest"``.
   - Scripts several languages write with the same scripts (Latin: en, es, fr, de) go to stage 2.
2. **Detector** for those groups: `lingua <https://github.com/pemistahl/lingua-py>`_
   (``lingua-language-detector``, offline n-gram models), restricted to the registered languages that
   tie. Each word is scored once (lingua's confidence values among those languages, cached per word; a
   language lingua rules out by a letter gets a floor of 0.01, not 0, so a loanword such as *café* cannot
   veto English) and a text scores the sum of its words' log-confidences. Lingua's n-grams live inside
   words, so this picks what lingua picks for the whole text (all 173 Latin-script prompts of the test set
   alike) while a word seen before (or a seed word: Speed, below) costs a dictionary look-up. The registry's
   ``fallback_language`` (English) gets prior odds of 2:1 against each other candidate: Latin text beside
   Japanese or Chinese is nearly always English tags (``anime style`` is as French as it is English to an
   n-gram model). All the Latin text of one prompt is read together (``in the street`` beside ``灯笼`` with
   the rest of the prompt's English); its separator-bounded chunks keep one language unless changing pays (Viterbi over
   the chunks, a switch costs 4 nats), which splits ``ein roter Apfel auf dem Tisch, masterpiece, best
   quality`` into German and English and leaves ``Porträt einer Frau, weiches Licht`` whole.

Why lingua (``python benchmarks/perf/router.py --compare``: the 173 single-language Latin-script prompts
of ``tests/data/router_prompts.tsv``, detectors restricted to en/es/fr/de, each in a fresh process, CPU
time on a loaded 2-core machine): lingua in high-accuracy mode gets 99.4% right at ~140 us a prompt,
+164 MB, 2.6 s to load; lingua's low-accuracy mode 93.6% at ~50 us, +16 MB; langid 97.1% at ~75 us,
+149 MB, 6-7 s to load (it misses short prompts: *gato*, *chaton*, *sunset*, *mountain lake*). Short
prompts are the common case, and lingua is the one that reads them; the per-word cache takes its cost
to ~30 us a prompt once words repeat. (With the prior the router itself answers 97.7% before the
threshold: the three one-word prompts it gives to English, *gato*, *chaton*, *requin*, are ones lingua
is under 0.45 sure of, which the registry's threshold of 0.5 sends to English anyway.)

Speed
-----
Lingua costs ~45 us for each word it has not scored before; the rest of routing ~20 us a prompt (CPU time,
2-core machine). So:

- **Seed words**: each language's entry may name a list of frequent words of its prompts
  (``detection.seed_words``: ``languages/<code>/seed_words.txt``, written by ``scripts/build_seed_words.py``
  from the hand-written ``prompt_words.txt`` and the words of its grammar; no scores). Those of the languages
  the detector tells apart (en/es/fr/de: ~4,500 words) are scored by lingua when it loads, once a process
  (~0.15 s beside lingua's own 1.2-2.5 s). A new prompt's common words then cost a look-up. Their scores are
  lingua's, so plans are the same with or without them (tested).
- **Batches**: :meth:`Router.plan_many` (``polybridge route --file``, ``generate`` and the pipeline use it)
  gives lingua the new words of all its prompts in one call, which lingua's Rust threads share out
  (``compute_language_confidence_values_in_parallel``, from PARALLEL_MIN new words); the same plans.
- **ASCII prompts** take a shortcut to the same plan: one regex for their separator-bounded chunks, words
  straight from the cache. Plans are cached per prompt (least recently used goes, PLAN_CACHE_SIZE).

``python benchmarks/perf/router.py`` (the test set's 368 prompts, CPU time, medians; a 2-core machine that
runs a training job, so figures move with its load): **cold** (a fresh router, every prompt new; 0.32 lingua
calls a prompt) ~17,000-26,000 prompts/s, one by one or batched: ~16,000-18,000 when the machine is busy (the
code before these paths: ~7,400 then), ~23,000-27,000 when it is quieter (before: ~10,000-11,000). Without
the seed words (1.67 calls a prompt) ~8,000-13,000; new prompts of known words ~36,000-57,000; repeated
prompts 2-7 million; peak memory 180-210 MB, nearly all lingua's models. Batching buys nothing here (no free
core for lingua's threads; the batch's word pass costs ~3 us a prompt); where cores are free it divides
lingua's time. Cold figures depend on the words: on the benchmark prompt sets (540 culture-specific prompts,
many names) 1.8 lingua calls a prompt remain (3.0 without the seed), ~6,600-9,900 prompts/s. Measured and
left out: lingua's low-accuracy mode as a prefilter (to keep this set's accuracy it may answer only where it
is 0.99 sure, 1 word in 5, so it adds ~20 us to the other 4), and skipping lingua for words with a letter
only one of the languages writes (ß, ñ, è, ...: 6% of the set's words, which lingua already answers fast).

Fallbacks
---------
- Detector confidence below the registry's ``detection_threshold``: the registry's ``fallback_language``
  (``how="fallback:unsure"``; ``detected`` keeps the guess).
- A script no registered language writes (Greek, Thai, Hebrew, ... with the shipped registry):
  ``fallback_language``, confidence 0.0 (``fallback:unknown-script``): the text goes as it is to the
  backbone's text encoder (with ``fallback_language: en``).
- Letters absent (digits, emoji, punctuation only): one span, ``fallback_language``, confidence 0.0
  (``fallback:no-letters``). Empty or whitespace-only prompts have no spans at all: the backbone reads
  ``""`` (an unconditional image).
- A language whose branch is not trained follows its entry's ``fallback``: ``zero-branch`` (target
  ``branch``, ``trained=False``: the zero-initialised branch, no effect), ``backbone`` (target
  ``backbone``: its text goes as it is to the backbone's encoder) or ``error`` (target ``error``: the
  pipeline refuses it).

Other input: control characters count as spaces; right-to-left text is handled in logical order like
any other (Arabic is ar by script; bidi marks are neutral); a 10,000-character prompt is routed like a
short one (linear time). Nothing but a non-string argument raises.

Spans and texts
---------------
Each span covers its letters plus the neutral characters up to the next separator (``,`` ``;`` ``|`` ``、``
``，`` ``。`` ``!`` ``?``, a period before a space ...); a separator-bounded piece with no letters (``8k`` in
``山水画, 8k, masterpiece``) joins a neighbouring span in the backbone's language if there is one, else the one
before it. A plan whose spans all go to one place passes the prompt on unchanged; otherwise each target
reads its spans joined (with ``", "`` where a separator stood between them, else a space)."""

from __future__ import annotations

import functools
import math
import re
import types
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from polybridge.errors import PolyBridgeTypeError, PolyBridgeValueError
from polybridge.unicode_scripts import SCRIPT_RANGES

#: Where a span goes. ``not-loaded``: a registered language a pipeline has not loaded.
TARGETS: tuple[str, ...] = ("backbone", "branch", "error", "not-loaded")

#: How a span's language was decided (:attr:`Span.how`).
HOW: dict[str, str] = {
    "script": "only this language writes these scripts",
    "script+context": "several languages write these scripts; a script only this one writes is elsewhere in the prompt",
    "script+fewest": "several languages write these scripts; this one is written in the fewest",
    "detector": "the detector (lingua) among the languages written in these scripts",
    "fallback:unsure": "the detector was below detection_threshold: the registry's fallback_language",
    "fallback:unknown-script": "no registered language writes this script: the registry's fallback_language",
    "fallback:no-letters": "no letters (digits, emoji, punctuation): the registry's fallback_language",
}

CONTEXT_CONFIDENCE = 0.9
FEWEST_CONFIDENCE = 0.8
#: Prior odds of the fallback language (English) against each other candidate in the detector stage.
PRIOR_RATIO = 2.0
#: What it costs (nats) for the next comma-separated chunk of Latin text to change language.
SWITCH_PENALTY = 4.0
#: Lingua's confidence floor per word (a language ruled out by a letter is unlikely, not impossible).
WORD_FLOOR = 1e-2
#: Words longer than this are scored on their first characters (bounds the per-word cache).
MAX_WORD = 40
WORD_CACHE_SIZE = 200_000
#: A batch with at least this many new words is scored by lingua's parallel call (else one call a word).
PARALLEL_MIN = 16
PLAN_CACHE_SIZE = 4096


# --------------------------------------------------------------------------- characters


def _char_class(ranges: Sequence[tuple[int, int]]) -> str:
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


_SCRIPTS: tuple[str, ...] = tuple(SCRIPT_RANGES)
_OTHER = len(_SCRIPTS)  # letters of a script the table does not list
_LATIN = _SCRIPTS.index("Latin")
_ASCII_LETTERS_RE = re.compile("[A-Za-z]+")  # ASCII letters are Latin (SCRIPT_RANGES); a fast path
_ALL_SCRIPTS = "".join(_char_class(r) for r in SCRIPT_RANGES.values())
# One alternative per script (group i+1: script i), then letters of no listed script; the lookahead (any of
# them) lets the engine pass over spaces and punctuation without trying every alternative.
_RUN_RE = re.compile(f"(?=[{_ALL_SCRIPTS}]|[^\\W\\d_])(?:" + "|".join(
    [f"(?P<s{i}>[{_char_class(SCRIPT_RANGES[name])}]+)" for i, name in enumerate(_SCRIPTS)]
    + [f"(?P<s{_OTHER}>[^\\W\\d_{_ALL_SCRIPTS}]+)"]) + ")")
# Number tags (4k, 8K, 1080p, 85mm, 3D) and short capitals (CG, HDR, UI) carry no language: their letters
# are masked before runs are found, so they stay with the text around them.
_NUMBER_TAG_RE = re.compile(r"(?<![A-Za-z0-9])(?:\d+[A-Za-z]{1,2}|[A-Z]{2,3})(?![A-Za-z0-9])")
_SEPARATOR_RE = re.compile(r"[,;|\n\r\t，、；。！？!?]|\.(?=\s|$)")
# An ASCII text's chunks: from a letter to the last letter before a separator (_SEPARATOR_RE, ASCII part).
_ASCII_CHUNK_RE = re.compile(r"[A-Za-z](?:(?:[^,;|\n\r\t!?.]|\.(?!\s))*[A-Za-z])?")
_EDGE = " \t\n\r\f\v,;|，、；。！？!?.\u3000"
_WORD_RE = re.compile(r"[^\W\d_]+")
# C0 and C1 control characters (and DEL), and invisible format characters that belong to no word (a BOM or
# zero-width no-break space U+FEFF, which lies in the Arabic presentation forms block; zero-width space;
# direction marks, embeddings and isolates; word joiner and invisible operators; line and paragraph separators)
# read as spaces; one character for one, so offsets hold. ZWJ and ZWNJ (U+200C, U+200D) stay: they are part of
# words in Indic and Arabic-script text.
_INVISIBLE = [0xFEFF, 0x200B, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2060, 0x2065),
              *range(0x2066, 0x206A), 0x2028, 0x2029, *range(0xFFF9, 0xFFFC)]
_CONTROLS = {c: " " for c in [*range(0x00, 0x20), *range(0x7F, 0xA0), *_INVISIBLE]}
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f" + "".join(chr(c) for c in _INVISIBLE) + "]")


def _mask_number_tags(text: str) -> str:
    if not _NUMBER_TAG_RE.search(text):
        return text
    return _NUMBER_TAG_RE.sub(lambda m: "0" * len(m.group()), text)


# --------------------------------------------------------------------------- the plan


class Span(NamedTuple):
    """One language span of a prompt: ``text`` is ``prompt[start:end]`` (control characters read as spaces).

    ``how`` says how the language was decided (:data:`HOW`); ``target`` where the text goes (:data:`TARGETS`);
    ``detected`` is the detector's guess when a fallback replaced it; ``trained`` is False for a language whose
    branch is not trained (its ``zero-branch`` fallback runs)."""

    text: str
    start: int
    end: int
    language: str
    confidence: float
    how: str
    target: str
    detected: str | None = None
    trained: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**self._asdict(), "confidence": round(self.confidence, 4)}


@dataclass(frozen=True)
class RoutePlan:
    """Where each part of one prompt goes: its spans in order, and the text each target reads.

    ``backbone_text`` is what the backbone's text encoder reads (English spans and whatever falls back to
    the backbone); ``branch_texts`` maps each language whose branch runs to its text."""

    prompt: str
    spans: tuple[Span, ...]
    backbone_language: str
    backbone_text: str = ""
    branch_texts: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))

    @property
    def languages(self) -> tuple[str, ...]:
        """The languages of the spans, each once, in order of first appearance."""
        return tuple(dict.fromkeys(s.language for s in self.spans))

    @property
    def label(self) -> str:
        """``zh``, ``en+zh``, ...; the backbone's language for a plan without spans (an empty prompt)."""
        return "+".join(self.languages) or self.backbone_language

    @property
    def is_mixed(self) -> bool:
        return len(self.languages) > 1

    def problems(self) -> list[Span]:
        """Spans that cannot be generated: their language's fallback is ``error``, or it is not loaded."""
        return [s for s in self.spans if s.target in ("error", "not-loaded")]

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "label": self.label, "spans": [s.to_dict() for s in self.spans],
                "backbone_text": self.backbone_text, "branch_texts": dict(self.branch_texts)}


# --------------------------------------------------------------------------- the detector


@functools.lru_cache(maxsize=8)
def _lingua_detector(codes: tuple[str, ...]) -> tuple[Any, dict[Any, int]]:
    """A lingua detector over the ``codes`` lingua knows, and each lingua language's index in ``codes``
    (``None`` and ``{}`` when fewer than two are known: nothing to tell apart). Shared by all routers."""
    try:
        from lingua import IsoCode639_1, IsoCode639_3, Language, LanguageDetectorBuilder
    except ImportError as exc:  # a dependency; say what to install rather than fail obscurely
        raise ImportError("the router's detector needs lingua: pip install lingua-language-detector") from exc
    index: dict[Any, int] = {}
    for i, code in enumerate(codes):
        base = code.split("-")[0].upper()
        if len(base) == 2 and getattr(IsoCode639_1, base, None) is not None:
            language = Language.from_iso_code_639_1(getattr(IsoCode639_1, base))
        elif len(base) == 3 and getattr(IsoCode639_3, base, None) is not None:
            language = Language.from_iso_code_639_3(getattr(IsoCode639_3, base))
        else:
            continue
        index.setdefault(language, i)  # zh and zh-TW are one lingua language: the first code gets it
    if len(index) < 2:
        return None, {}
    detector = LanguageDetectorBuilder.from_languages(*index).with_preloaded_language_models().build()
    return detector, index


class WordScorer:
    """Log-confidences of words among ``codes``, from lingua, cached per word. Lingua loads on first use.

    ``seed``: words scored (by lingua, in one batch) when lingua loads, so that the frequent words of prompts
    never cost a lingua call while routing (a router passes its languages' seed words, see :class:`Router`);
    none by default. They are scored once a process (like lingua's models, shared by all scorers) and stay
    cached when the cache is cleared (it is, when it holds ``cache_size`` words beyond them)."""

    def __init__(self, codes: Sequence[str], cache_size: int = WORD_CACHE_SIZE, seed: Iterable[str] = ()):
        self.codes = tuple(codes)
        self.cache_size = cache_size
        self._cache: dict[str, tuple[float, ...]] = {}
        self.seed_words = scorer_words(seed)
        self._seed: Mapping[str, tuple[float, ...]] = {}
        self._detector: Any = None
        self._index: dict[Any, int] | None = None
        self.lingua_calls = 0  # words lingua has scored for this scorer (the seed words are scored once a process)

    def _load(self) -> None:
        self._detector, self._index = _lingua_detector(self.codes)
        if self._detector is not None and self.seed_words:
            self._seed = _seed_scores(self.codes, self.seed_words)
            self._cache.update(self._seed)

    @property
    def known(self) -> tuple[str, ...]:
        """The codes lingua can return (loads lingua's models and scores the seed words)."""
        if self._index is None:
            self._load()
        return tuple(self.codes[i] for i in self._index.values())

    def _store(self, word: str, confidences: Any) -> tuple[float, ...]:
        floor = math.log(WORD_FLOOR)
        values = [floor] * len(self.codes)
        for cv in confidences:
            values[self._index[cv.language]] = math.log(max(cv.value, WORD_FLOOR))
        scores = tuple(values)
        if len(self._cache) >= self.cache_size + len(self._seed):
            self._cache.clear()
            self._cache.update(self._seed)
        self._cache[word] = scores
        return scores

    def word(self, word: str) -> tuple[float, ...]:
        """The log-confidences of one word (lowercase, NFC, at most MAX_WORD characters)."""
        scores = self._cache.get(word)
        if scores is not None:
            return scores
        if self._index is None:
            self._load()
        self.lingua_calls += 1
        return self._store(word, self._detector.compute_language_confidence_values(word)
                           if self._detector is not None else ())

    def score(self, words: Iterable[str]) -> int:
        """Score the ``words`` not cached yet and cache them: the same values as :meth:`word` one by one, but
        PARALLEL_MIN new words or more go to lingua in one call, which its Rust threads share out. How many
        were new."""
        if self._index is None:
            self._load()
        new = sorted(set(words).difference(self._cache))
        if not new or self._detector is None:
            return 0
        if len(new) < PARALLEL_MIN:
            found = [self._detector.compute_language_confidence_values(w) for w in new]
        else:
            found = self._detector.compute_language_confidence_values_in_parallel(new)
        self.lingua_calls += len(new)
        for w, confidences in zip(new, found):
            self._store(w, confidences)
        return len(new)

    def text(self, text: str) -> list[float]:
        """The sum of the log-confidences of ``text``'s words (zeros for no words)."""
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
        cache = self._cache
        scores = [cache.get(w) or self.word(w[:MAX_WORD]) for w in _WORD_RE.findall(text.lower())]
        return list(map(sum, zip(*scores))) if scores else [0.0] * len(self.codes)


@functools.lru_cache(maxsize=8)
def _seed_scores(codes: tuple[str, ...], words: tuple[str, ...]) -> Mapping[str, tuple[float, ...]]:
    """The log-confidences of the seed ``words`` among ``codes``: scored once a process, shared by all scorers."""
    scorer = WordScorer(codes, cache_size=len(words) + 1, seed=())
    scorer.score(words)
    return types.MappingProxyType(dict(scorer._cache))


# --------------------------------------------------------------------------- the router

# A group is [runs, candidates]: runs are (start, end) of letter runs; candidates the languages writing them all.
# A raw span is [start, end, language, confidence, how, detected].


class Router:
    """Routes prompts among registered languages. Build it with :meth:`from_registry`.

    ``languages`` maps each code to the scripts it is written in; ``routes`` maps a code to its target
    (``backbone``, ``branch``, ``error`` or ``not-loaded``; default: ``backbone`` for the backbone's
    language, ``branch`` for the rest) and ``untrained`` names languages whose branch is not trained.
    ``seed_words`` maps a code to its seed words (the registry entry's ``detection.seed_words``): the detector
    has lingua score those of the languages it tells apart when it loads (Speed, in the module docstring).
    Plans are cached per prompt (``cache_size`` prompts, 0: none).
    """

    def __init__(self, languages: Mapping[str, Sequence[str]], *, backbone_language: str = "en",
                 fallback_language: str | None = None, threshold: float = 0.5,
                 routes: Mapping[str, str] | None = None, untrained: Sequence[str] = (),
                 cache_size: int = PLAN_CACHE_SIZE, scorer: WordScorer | None = None,
                 seed_words: Mapping[str, Iterable[str]] | None = None):
        if not languages:
            raise PolyBridgeValueError("a router needs at least one language")
        self.languages = {code: tuple(scripts) for code, scripts in languages.items()}
        for code, scripts in self.languages.items():
            unknown = [s for s in scripts if s not in SCRIPT_RANGES]
            if unknown:
                raise PolyBridgeValueError(f"language {code!r}: unknown script {unknown[0]!r}; valid: {', '.join(_SCRIPTS)}")
        self.backbone_language = backbone_language
        self.fallback_language = fallback_language or backbone_language
        for name, code in (("backbone_language", backbone_language), ("fallback_language", self.fallback_language)):
            if code not in self.languages:
                raise PolyBridgeValueError(f"{name} {code!r} is not one of the router's languages: {', '.join(self.languages)}")
        if not 0.0 <= threshold <= 1.0:
            raise PolyBridgeValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.routes = {code: "backbone" if code == backbone_language else "branch" for code in self.languages}
        for code, target in (routes or {}).items():
            if code not in self.languages or target not in TARGETS:
                raise PolyBridgeValueError(f"routes: {code!r} -> {target!r}; codes: {', '.join(self.languages)}; "
                                 f"targets: {', '.join(TARGETS)}")
            self.routes[code] = target
        self.untrained = frozenset(untrained)
        self.cache_size = cache_size
        # Which languages write each script; languages that tie (the same scripts as another) need the detector.
        self._claims = [frozenset(c for c, s in self.languages.items() if name in s) for name in _SCRIPTS]
        self._claims.append(frozenset())  # _OTHER: letters of an unlisted script
        tied = [c for c, s in self.languages.items()
                if sum(set(o) == set(s) for o in self.languages.values()) > 1]
        if scorer is None and tied:
            seed = [w for code in tied for w in (seed_words or {}).get(code, ())]
            scorer = WordScorer(tied, seed=seed)
        self.scorer = scorer
        self._strategies: dict[frozenset[str], tuple[Any, ...]] = {}
        self._setups: dict[frozenset[str], tuple[list[int], list[float]] | None] = {}
        self._ascii_setup: Any = None  # _plan_ascii: the detector setup of Latin text, False: not its case
        self._plans: OrderedDict[str, RoutePlan] = OrderedDict()  # the plan cache (least recently used goes)
        # Words the detector may read: letters of the scripts of the languages that tie (plan_many scores them first).
        tied_scripts = sorted({s for c in tied for s in self.languages[c]})
        self._tied_word_re = re.compile(f"[{''.join(_char_class(SCRIPT_RANGES[s]) for s in tied_scripts)}]+") \
            if tied_scripts else None

    @classmethod
    def from_registry(cls, registry: Any, routes: Mapping[str, str] | None = None,
                      untrained: Sequence[str] | None = None, **kwargs: Any) -> Router:
        """A router over every registered language. By default a language's target and ``trained`` flag come
        from its entry: a trained branch (weights present or a hub id) is ``branch``; an untrained one
        follows its ``fallback`` (``zero-branch``: ``branch``, untrained; ``backbone``; ``error``). Each entry's
        seed words come along (``seed_words``)."""
        backbone = registry.backbone().language
        kwargs.setdefault("seed_words", {c: e.seed_words for c, e in registry.languages.items()})
        default_routes, default_untrained = {}, []
        for code, entry in registry.languages.items():
            if code == backbone or entry.is_backbone_language:
                default_routes[code] = "backbone"
                continue
            if entry.status()["branch"] in ("present", "hub"):
                default_routes[code] = "branch"
                continue
            default_untrained.append(code)
            default_routes[code] = {"zero-branch": "branch", "backbone": "backbone"}.get(entry.fallback, "error")
        return cls({c: e.scripts for c, e in registry.languages.items()}, backbone_language=backbone,
                   fallback_language=registry.fallback_language, threshold=registry.detection_threshold,
                   routes={**default_routes, **(routes or {})},
                   untrained=default_untrained if untrained is None else untrained, **kwargs)

    def with_routes(self, routes: Mapping[str, str], untrained: Sequence[str] = ()) -> Router:
        """The same router with other targets, sharing the detector and its word cache."""
        return Router(self.languages, backbone_language=self.backbone_language,
                      fallback_language=self.fallback_language, threshold=self.threshold, routes=routes,
                      untrained=untrained, cache_size=self.cache_size, scorer=self.scorer)

    # ------------------------------------------------------------------ planning

    def plan(self, prompt: str) -> RoutePlan:
        """The :class:`RoutePlan` of one prompt (cached per prompt)."""
        if not isinstance(prompt, str):
            raise PolyBridgeTypeError(f"prompt must be a string, got {type(prompt).__name__}")
        plans = self._plans
        found = plans.get(prompt)
        if found is not None:
            try:
                plans.move_to_end(prompt)
            except KeyError:  # another thread dropped it meanwhile
                pass
            return found
        found = self._plan(prompt)
        if self.cache_size:
            plans[prompt] = found
            if len(plans) > self.cache_size:
                plans.popitem(last=False)
        return found

    def plan_many(self, prompts: Sequence[str]) -> list[RoutePlan]:
        """The plans of several prompts, as :meth:`plan` gives them; faster for a batch of new prompts: the
        new words of all of them go to lingua in one call, which spreads them over its threads. A bare string is
        refused (it would be planned character by character); :meth:`plan` takes one prompt."""
        if isinstance(prompts, (str, bytes)):
            raise PolyBridgeTypeError(f"prompts must be a list of strings, got one {type(prompts).__name__} "
                                      "(use Router.plan for one prompt, or pass [prompt])")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise PolyBridgeTypeError(f"prompt must be a string, got {type(prompt).__name__}")
        scorer = self.scorer
        if scorer is not None and self._tied_word_re is not None:
            new = [p for p in dict.fromkeys(prompts) if p not in self._plans]
            if new:
                text = _mask_number_tags("\n".join(new))
                if not text.isascii():
                    text = unicodedata.normalize("NFC", text)
                words = set(self._tied_word_re.findall(text.lower()))
                if words:
                    scorer.score(w[:MAX_WORD] for w in words)
        return [self.plan(p) for p in prompts]

    def detect(self, text: str) -> tuple[str, float]:
        """The language of ``text`` as a whole (the one with most letters) and its confidence;
        ``(fallback_language, 0.0)`` for text without letters."""
        plan = self.plan(text)
        weight: dict[str, int] = {}
        for s in plan.spans:
            weight[s.language] = weight.get(s.language, 0) + sum(ch.isalpha() for ch in s.text)
        if not any(weight.values()):
            return self.fallback_language, 0.0
        best = max(weight, key=weight.__getitem__)
        return best, min(s.confidence for s in plan.spans if s.language == best)

    def _strategy(self, candidates: frozenset[str]) -> tuple[Any, ...]:
        """How a group with these candidates is decided (memoised): ("unknown",), ("script", code),
        ("rules", candidates, default code or None, detector key) or ("detector", candidates)."""
        found = self._strategies.get(candidates)
        if found is not None:
            return found
        if not candidates:
            found = ("unknown",)
        elif len(candidates) == 1:
            found = ("script", next(iter(candidates)))
        else:
            fewest = min(len(self.languages[c]) for c in candidates)
            simplest = frozenset(c for c in candidates if len(self.languages[c]) == fewest)
            if len(simplest) < len(candidates):
                found = ("rules", candidates, next(iter(simplest)) if len(simplest) == 1 else None, simplest)
            else:
                found = ("detector", candidates)
        self._strategies[candidates] = found
        return found

    def _plan(self, prompt: str) -> RoutePlan:
        clean = prompt.translate(_CONTROLS) if _CONTROL_RE.search(prompt) else prompt
        masked = _mask_number_tags(clean)
        if masked.isascii():
            fast = self._plan_ascii(prompt, clean, masked)
            if fast is not None:
                return fast
        groups = self._groups(masked)
        if not groups:
            core = clean.strip(_EDGE)
            if not core:
                return self._finish(prompt, clean, [])
            start = clean.index(core)
            return self._finish(prompt, clean, [[start, start + len(core), self.fallback_language, 0.0,
                                                 "fallback:no-letters", None]])
        raw: list[list[Any]] = []
        pending: dict[frozenset[str], list[int]] = {}  # detector candidates -> positions in raw
        distinct: list[tuple[int, str]] | None = None
        for runs, candidates in groups:
            start, end = runs[0][0], runs[-1][1]
            strategy = self._strategy(candidates)
            kind = strategy[0]
            if kind == "script":
                raw.append([start, end, strategy[1], 1.0, "script", None])
            elif kind == "unknown":
                raw.append([start, end, self.fallback_language, 0.0, "fallback:unknown-script", None])
            else:
                if kind == "rules":
                    if distinct is None:  # languages that a script of their own shows in this prompt
                        distinct = [(r[0][0], next(iter(c))) for r, c in groups if len(c) == 1]
                    near = [(abs(pos - start), code) for pos, code in distinct if code in candidates]
                    if near:
                        raw.append([start, end, min(near)[1], CONTEXT_CONFIDENCE, "script+context", None])
                        continue
                    if strategy[2] is not None:
                        raw.append([start, end, strategy[2], FEWEST_CONFIDENCE, "script+fewest", None])
                        continue
                    candidates = strategy[3]
                pending.setdefault(candidates, []).append(len(raw))
                raw.append([start, end, runs])
        for candidates, positions in pending.items():
            found = self._detect(masked, [raw[i][2] for i in positions], candidates)
            for i, spans in zip(positions, found):
                raw[i] = spans
        spans: list[list[Any]] = []
        for item in raw:
            if isinstance(item[0], list):  # a group the detector split into spans
                spans.extend(item)
            else:
                spans.append(item)
        for s in spans:
            if s[4] == "detector" and s[3] < self.threshold:
                s[2], s[4], s[5] = self.fallback_language, "fallback:unsure", s[2]
        return self._finish(prompt, clean, spans)

    def _groups(self, text: str) -> list[tuple[list[tuple[int, int]], frozenset[str]]]:
        """Letter runs of one script, grouped while some language writes all the group's scripts."""
        if text.isascii():  # the common case: only Latin letters
            runs = [m.span() for m in _ASCII_LETTERS_RE.finditer(text)]
            return [(runs, self._claims[_LATIN])] if runs else []
        groups: list[tuple[list[tuple[int, int]], frozenset[str]]] = []
        claims_of = self._claims
        for m in _RUN_RE.finditer(text):
            claims = claims_of[m.lastindex - 1]
            if groups:
                runs, last = groups[-1]
                if not claims and not last:  # unknown scripts next to each other: one span
                    runs.append(m.span())
                    continue
                both = last & claims
                if both:
                    runs.append(m.span())
                    if both != last:
                        groups[-1] = (runs, both)
                    continue
            groups.append(([m.span()], claims))
        return groups

    def _detector_setup(self, candidates: frozenset[str]) -> tuple[list[int], list[float]] | None:
        """For the detector among ``candidates``: their indices in the scorer and their log-priors (the
        fallback language is PRIOR_RATIO times as likely as each other one); None if lingua cannot tell
        them apart (it knows fewer than two of them). Memoised."""
        if candidates not in self._setups:
            scorer = self.scorer
            known = set(scorer.known) if scorer is not None else set()
            allowed = [i for i, c in enumerate(scorer.codes) if c in candidates and c in known] if known else []
            prior = [math.log(PRIOR_RATIO) if scorer.codes[i] == self.fallback_language else 0.0 for i in allowed]
            self._setups[candidates] = (allowed, prior) if len(allowed) >= 2 else None
        return self._setups[candidates]

    def _detect(self, text: str, groups: list[list[tuple[int, int]]], candidates: frozenset[str]):
        """Detector stage for the groups (runs) whose candidates tie: one list of raw spans per group."""
        setup = self._detector_setup(candidates)
        if setup is None:  # nothing to tell them apart: the first one, as a guess (confidence 0)
            code = next(c for c in self.languages if c in candidates)
            return [[[runs[0][0], runs[-1][1], code, 0.0, "detector", None]] for runs in groups]
        scorer = self.scorer
        chunks = []  # (group, start, end, scores): the separator-bounded pieces of every group, in order
        for gi, runs in enumerate(groups):
            seps = [m.start() for m in _SEPARATOR_RE.finditer(text, runs[0][1], runs[-1][1])]
            first = last = runs[0]
            j = 0
            for run in runs[1:]:
                if j < len(seps) and seps[j] < run[0]:  # a separator before this run: a new chunk
                    chunks.append((gi, first[0], last[1], scorer.text(text[first[0]:last[1]])))
                    first = run
                    while j < len(seps) and seps[j] < run[0]:
                        j += 1
                last = run
            chunks.append((gi, first[0], last[1], scorer.text(text[first[0]:last[1]])))
        return self._decide(chunks, setup, len(groups))

    def _plan_ascii(self, prompt: str, clean: str, masked: str) -> RoutePlan | None:
        """The common case, an ASCII prompt with letters whose Latin text goes to the detector: what
        :meth:`_plan` would give, with its chunks read by one regex and the words scored straight from the
        cache. None: not that case (the general path decides)."""
        setup = self._ascii_setup
        if setup is None:
            strategy = self._strategy(self._claims[_LATIN])
            setup = self._ascii_setup = (self._detector_setup(strategy[1]) or False) if strategy[0] == "detector" \
                else False
        if setup is False:
            return None
        bounds = [m.span() for m in _ASCII_CHUNK_RE.finditer(masked)]
        if not bounds:
            return None
        lower = masked.lower()
        scorer = self.scorer
        cache, word, find = scorer._cache, scorer.word, _ASCII_LETTERS_RE.findall
        chunks = []
        for start, end in bounds:
            scores = [cache.get(w) or word(w[:MAX_WORD]) for w in find(lower, start, end)]
            chunks.append((0, start, end, list(map(sum, zip(*scores)))))
        (spans,) = self._decide(chunks, setup, 1)
        for s in spans:
            if s[3] < self.threshold:
                s[2], s[4], s[5] = self.fallback_language, "fallback:unsure", s[2]
        return self._finish(prompt, clean, spans)

    def _decide(self, chunks: list[tuple[int, int, int, list[float]]], setup: tuple[list[int], list[float]],
                ngroups: int) -> list[list[list[Any]]]:
        """The detector's spans from scored chunks ``(group, start, end, scores)``: one list per group."""
        allowed, prior = setup
        codes = self.scorer.codes
        if len(chunks) == 1:
            scores = chunks[0][3]
            posterior = [scores[i] + p for i, p in zip(allowed, prior)]
            top = max(posterior)
            k = posterior.index(top)
            z = sum([math.exp(v - top) for v in posterior])
            return [[[chunks[0][1], chunks[0][2], codes[allowed[k]], 1.0 / z, "detector", None]]]
        # Viterbi over chunks: a chunk keeps the language of the one before it unless switching pays
        # SWITCH_PENALTY nats; the prompt's Latin text is one language unless a run of chunks clearly is not.
        path = _viterbi([[c[3][i] for i in allowed] for c in chunks], prior)
        # Runs of chunks in one language become spans (never across groups); confidence: that run's posterior.
        out: list[list[list[Any]]] = [[] for _ in range(ngroups)]
        merged: list[list[Any]] = []  # [group, start, end, k, summed scores]
        for (gi, start, end, scores), k in zip(chunks, path):
            if merged and merged[-1][0] == gi and merged[-1][3] == k:
                merged[-1][2] = end
                merged[-1][4] = [a + b for a, b in zip(merged[-1][4], scores)]
            else:
                merged.append([gi, start, end, k, scores])
        for gi, start, end, k, scores in merged:
            posterior = [scores[i] + p for i, p in zip(allowed, prior)]
            z = sum(math.exp(v - posterior[k]) for v in posterior)
            out[gi].append([start, end, codes[allowed[k]], 1.0 / z, "detector", None])
        return out

    def _finish(self, prompt: str, clean: str, raw: list[list[Any]]) -> RoutePlan:
        """Extend span cores over their neutral neighbours, merge neighbours of one language, build the plan."""
        if len(raw) == 1:  # one span (most prompts): every letterless piece is its own
            s = raw[0]
            core = clean.strip(_EDGE)
            start = len(clean) - len(clean.lstrip(_EDGE))
            code = s[2]
            target = self.routes[code]
            span = Span(core, start, start + len(core), code, float(s[3]), s[4], target, s[5],
                        code not in self.untrained)
            if target == "backbone":
                backbone, branches = clean, {}
            elif target == "branch":
                backbone, branches = "", {code: clean}
            else:
                backbone, branches = _texts(clean, [span])
            return RoutePlan(prompt, (span,), self.backbone_language, backbone, types.MappingProxyType(branches))
        merged: list[list[Any]] = []
        for s in raw:
            if merged and merged[-1][2] == s[2] and merged[-1][4] == s[4]:
                merged[-1][1] = s[1]
                merged[-1][3] = min(merged[-1][3], s[3])
            else:
                merged.append(s)
        if len(merged) == 1:  # one span: every letterless piece is its own
            bounds = [[0, len(clean)]]
        else:
            bounds = self._bounds(clean, merged) if merged else []
        spans = []
        for (start, end), s in zip(bounds, merged):
            piece = clean[start:end]
            core = piece.strip(_EDGE)
            start += piece.index(core) if core else 0
            code = s[2]
            spans.append(Span(core, start, start + len(core), code, float(s[3]), s[4], self.routes[code], s[5],
                              code not in self.untrained))
        backbone, branches = _texts(clean, spans)
        return RoutePlan(prompt, tuple(spans), self.backbone_language, backbone, types.MappingProxyType(branches))

    def _bounds(self, clean: str, merged: list[list[Any]]) -> list[list[int]]:
        """Each span's extent: its letters, the neutral text up to the separators around it, and the
        letterless pieces between separators (to a neighbour in the backbone's language, else the one before)."""
        n = len(merged)
        bounds = [[s[0], s[1]] for s in merged]
        for i in range(n + 1):
            lo = merged[i - 1][1] if i > 0 else 0
            hi = merged[i][0] if i < n else len(clean)
            if lo >= hi:
                continue
            seps = [m.span() for m in _SEPARATOR_RE.finditer(clean, lo, hi)]
            if not seps:  # no separator: the gap joins the span before it (at the start, the one after)
                if i > 0:
                    bounds[i - 1][1] = hi
                else:
                    bounds[0][0] = lo
                continue
            parts, cur = [], lo
            for a, b in seps:
                parts.append((cur, a))
                cur = b
            parts.append((cur, hi))
            free = parts[1:-1]
            if i > 0:
                bounds[i - 1][1] = parts[0][1]
            else:
                free.insert(0, parts[0])
            if i < n:
                bounds[i][0] = parts[-1][0]
            else:
                free.append(parts[-1])
            free = [p for p in free if clean[p[0]:p[1]].strip(_EDGE)]
            if free:
                prev_bb = i > 0 and merged[i - 1][2] == self.backbone_language
                next_bb = i < n and merged[i][2] == self.backbone_language
                if i < n and (i == 0 or (next_bb and not prev_bb)):
                    bounds[i][0] = free[0][0]
                else:
                    bounds[i - 1][1] = free[-1][1]
        return bounds


def _viterbi(emissions: list[list[float]], prior: list[float]) -> list[int]:
    """Most likely language per chunk: start with ``prior``, pay SWITCH_PENALTY (then the prior) to change."""
    best = [p + e for p, e in zip(prior, emissions[0])]
    back: list[list[int]] = []
    for scores in emissions[1:]:
        top_score = max(best)
        top = best.index(top_score)
        row, step = [], []
        for k, (b, e, p) in enumerate(zip(best, scores, prior)):
            switch = top_score - SWITCH_PENALTY + p
            if b >= switch:
                row.append(k)
                step.append(b + e)
            else:
                row.append(top)
                step.append(switch + e)
        back.append(row)
        best = step
    path = [best.index(max(best))]
    for row in reversed(back):
        path.append(row[path[-1]])
    return path[::-1]


def _texts(clean: str, spans: list[Span]) -> tuple[str, dict[str, str]]:
    """The backbone's text and each branch's: the prompt as written when every span goes to one place."""
    keys = [("backbone", None) if s.target == "backbone" else (s.target, s.language) for s in spans]
    if len(set(keys)) == 1 and keys[0][0] in ("backbone", "branch"):
        return (clean, {}) if keys[0][0] == "backbone" else ("", {spans[0].language: clean})
    joined: dict[tuple[str, str | None], str] = {}
    last_end: dict[tuple[str, str | None], int] = {}
    for key, s in zip(keys, spans):
        if key in joined:
            sep = ", " if _SEPARATOR_RE.search(clean, last_end[key], s.start) else " "
            joined[key] += sep + s.text
        else:
            joined[key] = s.text
        last_end[key] = s.end
    backbone = joined.pop(("backbone", None), "")
    return backbone, {code: text for (target, code), text in joined.items() if target == "branch"}


# --------------------------------------------------------------------------- evaluation


def read_route_set(path: str | Path) -> list[tuple[str, str]]:
    """A routing test set: ``(expected, prompt)`` rows from a UTF-8 file of ``EXPECTED<TAB>PROMPT`` lines
    (``#`` starts a comment line). ``EXPECTED`` is a language code, or for a mixed prompt its spans,
    ``lang:text | lang:text``. See ``tests/data/router_prompts.tsv``."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise PolyBridgeValueError(f"{path}: line {number}: expected EXPECTED<TAB>PROMPT, got {line!r}")
        rows.append((parts[0], parts[1]))
    return rows


def expected_spans(expected: str) -> list[tuple[str, str]]:
    """``"en:a city | zh:灯笼"`` as ``[("en", "a city"), ("zh", "灯笼")]``."""
    return [(code.strip(), text.strip()) for code, _, text in (part.partition(":") for part in expected.split(" | "))]


def score_routes(router: Router, rows: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Accuracy of ``router`` on a test set: per language (single-language prompts: right when the plan is one
    span in that language), overall, and mixed prompts split right (the same spans, languages and texts),
    with the misses."""
    per: dict[str, list[int]] = {}
    mixed, misses = [0, 0], []
    for expected, prompt in rows:
        plan = router.plan(prompt)
        got = [(s.language, s.text) for s in plan.spans]
        if ":" in expected:
            ok = got == expected_spans(expected)
            mixed[0] += ok
            mixed[1] += 1
        else:
            ok = len(got) == 1 and got[0][0] == expected
            cell = per.setdefault(expected, [0, 0])
            cell[0] += ok
            cell[1] += 1
        if not ok:
            misses.append({"prompt": prompt, "expected": expected, "got": " | ".join(f"{c}:{t}" for c, t in got)})
    right, total = sum(c[0] for c in per.values()), sum(c[1] for c in per.values())
    return {
        "per_language": {code: {"right": r, "total": n, "accuracy": r / n} for code, (r, n) in per.items()},
        "single": {"right": right, "total": total, "accuracy": right / total if total else float("nan")},
        "mixed": {"right": mixed[0], "total": mixed[1], "accuracy": mixed[0] / mixed[1] if mixed[1] else float("nan")},
        "misses": misses,
    }


def format_scores(scores: Mapping[str, Any]) -> str:
    """The per-language table of :func:`score_routes`, as text."""
    lines = [f"{'language':10} {'right':>5} {'total':>5} {'accuracy':>9}"]
    for code, cell in scores["per_language"].items():
        lines.append(f"{code:10} {cell['right']:5d} {cell['total']:5d} {cell['accuracy']:9.1%}")
    for name in ("single", "mixed"):
        cell = scores[name]
        lines.append(f"{name + ' (all)' if name == 'single' else 'mixed split':10} {cell['right']:5d} "
                     f"{cell['total']:5d} {cell['accuracy']:9.1%}")
    lines += [f"  miss: {m['prompt']!r}: expected {m['expected']}, got {m['got']}" for m in scores["misses"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- seed words


def scorer_words(texts: Iterable[str]) -> tuple[str, ...]:
    """The words of ``texts`` as the scorer reads prompts (NFC, lowercase, letters only, at most MAX_WORD
    characters), each once, in order: what a seed-word list holds (``scripts/build_seed_words.py`` writes
    them so, and the router reads them so)."""
    text = unicodedata.normalize("NFC", "\n".join(texts).lower())
    return tuple(dict.fromkeys(w[:MAX_WORD] for w in _WORD_RE.findall(text)))
