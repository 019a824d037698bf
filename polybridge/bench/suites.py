"""The benchmark suites: what every method is asked to draw, per language.

Three suites per language:

- ``general``: synthetic-world scenes of generic shapes only (circle, square, ...), the **same scenes for every
  language** (so languages compare on equal ground), each captioned in the language and in English, with the
  dictionary translation (:mod:`polybridge.bench.translate`) alongside. Ground truth: the scene.
- ``culture``: scenes in which at least one object is one of the language's own culture-specific concepts
  (a lantern or a pagoda for zh), named natively in its captions; English calls them "an object". Ground truth:
  the scene.
- ``curated``: real-deployment prompts written natively in AltDiffusion MC-18's six categories (painting,
  literature, festival, food, clothing, landmark), each with an English translation
  (``benchmarks/prompts/<code>.yaml``, named by the entry's ``benchmark.prompt_sets``). No ground truth: scored
  with the CLIP model the entry names (``benchmark.clip_model``).

Synthetic suites are a pure function of the registry entry (``benchmark.seed``, ``synthetic_split``,
``synthetic_prompts``) and the grammars: scene ``i`` comes from the split's seeded stream, its captions from
:func:`~polybridge.synthetic.scenes.scene_rng`, so a smaller ``n`` (``--quick``) gives a prefix of the full suite.
``benchmarks/synthetic/<code>/{general,culture}.jsonl`` is a readable snapshot of the full suites, written by
``python benchmarks/build_suites.py`` and checked against this module by the tests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polybridge.errors import PolyBridgeError
from polybridge.registry import LanguageEntry, Registry, RegistryError, read_yaml
from polybridge.synthetic.scenes import sample_scenes, scene_rng
from polybridge.synthetic.world import SHAPES, Scene

#: Suite names, in report order (``plugins``: :mod:`polybridge.bench.plugins`, run once for every language).
SUITES: tuple[str, ...] = ("general", "culture", "curated", "plugins")
SYNTHETIC_SUITES: tuple[str, ...] = ("general", "culture")
#: What a run does without ``--suites``.
DEFAULT_SUITES: tuple[str, ...] = ("general", "culture", "plugins")

#: AltDiffusion MC-18's categories of culture-specific prompts.
CATEGORIES: tuple[str, ...] = ("painting", "literature", "festival", "food", "clothing", "landmark")

#: Keys of one curated prompt and of a curated prompt file.
_PROMPT_KEYS = ("id", "category", "text", "en")
_FILE_KEYS = ("language", "description", "prompts")


class SuiteError(PolyBridgeError, ValueError):
    """A suite cannot be built: a bad prompt file or a language that lacks what the suite needs."""


@dataclass(frozen=True)
class SuiteItem:
    """One prompt of a suite: the native ``prompt``, its ``english`` counterpart (the English caption of the same
    scene, or a human translation), the ground-truth ``scene`` (synthetic suites) and, per suite, the dictionary
    ``translation`` (synthetic) or the ``category`` and ``id`` (curated)."""

    index: int
    prompt: str
    english: str
    scene: Scene | None = None
    translation: str | None = None
    category: str | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
        if self.category is not None:
            out["category"] = self.category
        out["prompt"] = self.prompt
        out["english"] = self.english
        if self.translation is not None:
            out["translation"] = self.translation
        if self.scene is not None:
            out["scene"] = self.scene.to_dict()
        return out


@dataclass(frozen=True)
class Suite:
    """The prompts one language is benchmarked on in one suite."""

    name: str
    language: str
    items: tuple[SuiteItem, ...]
    concepts: tuple[str, ...] = ()
    seed: int | None = None
    split: str | None = None
    sources: tuple[str, ...] = field(default_factory=tuple)

    @property
    def prompts(self) -> list[str]:
        return [item.prompt for item in self.items]

    @property
    def english(self) -> list[str]:
        return [item.english for item in self.items]

    @property
    def translations(self) -> list[str]:
        return [item.translation or "" for item in self.items]

    @property
    def scenes(self) -> list[Scene]:
        return [item.scene for item in self.items if item.scene is not None]

    @property
    def has_truth(self) -> bool:
        return bool(self.items) and all(item.scene is not None for item in self.items)

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------- synthetic suites


def general_scenes(n: int, seed: int, split: str) -> list[tuple[int, Scene]]:
    """``n`` scenes of generic shapes only, with their stream indices (the same for every language)."""
    return list(enumerate(sample_scenes(n, seed, split, objects=SHAPES)))


def culture_scenes(n: int, seed: int, split: str, concepts: Sequence[str]) -> list[tuple[int, Scene]]:
    """The first ``n`` scenes of the stream (generic shapes plus ``concepts``) that show at least one of
    ``concepts``, with their stream indices."""
    if not concepts:
        raise SuiteError("a culture suite needs at least one concept")
    wanted = set(concepts)
    found: list[tuple[int, Scene]] = []
    start, window = 0, max(16, 4 * n)
    while len(found) < n:
        for i, scene in enumerate(sample_scenes(window, seed, split, concepts=concepts, start=start), start):
            if any(o.shape in wanted for o in scene.objects):
                found.append((i, scene))
                if len(found) == n:
                    break
        start += window
    return found


def synthetic_suite(registry: Registry, code: str, name: str, n: int | None = None,
                    grammars: dict | None = None, dictionary: Any = None) -> Suite:
    """Language ``code``'s ``general`` or ``culture`` suite: ``n`` prompts (default: the entry's
    ``benchmark.synthetic_prompts``). ``grammars`` (``{code: Grammar}``, with ``en``) and ``dictionary``
    (:class:`~polybridge.bench.translate.Dictionary`) are built from the registry when not given."""
    from polybridge.bench.translate import build_dictionary
    from polybridge.synthetic.captions import load_grammars

    if name not in SYNTHETIC_SUITES:
        raise SuiteError(f"unknown synthetic suite {name!r}; valid: {', '.join(SYNTHETIC_SUITES)}")
    entry = registry.language(code)
    english_code = registry.backbone().language
    reason = synthetic_unavailable(entry, name)
    if reason:
        raise SuiteError(f"{code}: {reason}")
    spec = entry.benchmark
    n = spec.synthetic_prompts if n is None else n
    if n < 1:
        raise SuiteError(f"{code} {name}: n must be at least 1, got {n}")
    if grammars is None or code not in grammars or english_code not in grammars:
        grammars = {**(grammars or {}), **load_grammars(registry, [code, english_code])}
    native, english = grammars[code], grammars[english_code]
    if dictionary is None:
        dictionary = build_dictionary(native, english)
    concepts = tuple(entry.synthetic.concepts) if name == "culture" else ()
    if name == "general":
        drawn = general_scenes(n, spec.seed, spec.synthetic_split)
    else:
        drawn = culture_scenes(n, spec.seed, spec.synthetic_split, concepts)
    purpose = f"bench-{name}"
    items = []
    for index, scene in drawn:
        prompt = native.caption(scene, scene_rng(spec.seed, spec.synthetic_split, index, purpose))
        caption_en = english.caption(scene, scene_rng(spec.seed, spec.synthetic_split, index, purpose))
        items.append(SuiteItem(index=index, prompt=prompt, english=caption_en, scene=scene,
                               translation=dictionary.translate(prompt)))
    return Suite(name=name, language=code, items=tuple(items), concepts=concepts, seed=spec.seed,
                 split=spec.synthetic_split, sources=(str(entry.grammar_path),))


def synthetic_unavailable(entry: LanguageEntry, name: str) -> str | None:
    """Why ``entry`` has no ``name`` suite, or ``None`` when it has one."""
    if entry.synthetic is None:
        return f"no synthetic-world grammar ({entry.file}, key synthetic)"
    if name == "culture" and not entry.synthetic.concepts:
        return f"owns no culture-specific concepts ({entry.file}, key synthetic.concepts)"
    return None


# --------------------------------------------------------------------------- curated suites


def load_prompt_file(path: str | Path, code: str | None = None) -> list[SuiteItem]:
    """The prompts of one curated file (``benchmarks/prompts/<code>.yaml``), validated.

    The file is ``language: <code>``, an optional ``description`` and ``prompts:``, a list of
    ``{id, category, text, en}``: a unique id, one of :data:`CATEGORIES`, the native prompt and its English
    translation. Every error names the file and the key.
    """
    path = Path(path)
    try:
        data = read_yaml(path)
    except RegistryError as exc:
        raise SuiteError(str(exc)) from None

    def fail(key: str, problem: str) -> SuiteError:
        return SuiteError(f"{path}: {key}: {problem}")

    if not isinstance(data, dict):
        raise fail("(top level)", f"expected a mapping with {', '.join(_FILE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(_FILE_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key; valid: {', '.join(_FILE_KEYS)}")
    language = data.get("language")
    if not isinstance(language, str):
        raise fail("language", f"expected a language code, got {language!r}")
    if code is not None and language != code:
        raise fail("language", f"{language!r}, but the file is named by language {code!r}")
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise fail("prompts", "expected a non-empty list of {id, category, text, en}")
    items, seen = [], {}
    for i, prompt in enumerate(prompts):
        where = f"prompts[{i}]"
        if not isinstance(prompt, dict):
            raise fail(where, f"expected a mapping with {', '.join(_PROMPT_KEYS)}")
        for key in prompt:
            if key not in _PROMPT_KEYS:
                raise fail(f"{where}.{key}", f"unknown key; valid: {', '.join(_PROMPT_KEYS)}")
        for key in _PROMPT_KEYS:
            value = prompt.get(key)
            if not isinstance(value, str) or not value.strip():
                raise fail(f"{where}.{key}", f"expected a non-empty string, got {value!r}")
        if prompt["category"] not in CATEGORIES:
            raise fail(f"{where}.category", f"unknown category {prompt['category']!r}; valid: {', '.join(CATEGORIES)}")
        if prompt["id"] in seen:
            raise fail(f"{where}.id", f"duplicate id {prompt['id']!r} (also prompts[{seen[prompt['id']]}])")
        seen[prompt["id"]] = i
        items.append(SuiteItem(index=i, prompt=prompt["text"].strip(), english=prompt["en"].strip(),
                               category=prompt["category"], id=prompt["id"]))
    return items


def curated_suite(registry: Registry, code: str, n: int | None = None) -> Suite:
    """Language ``code``'s curated prompts from every file its entry lists; with ``n``, the first prompts of each
    category in turn (so a short run still covers every category)."""
    entry = registry.language(code)
    if not entry.benchmark.prompt_sets:
        raise SuiteError(f"{code}: no curated prompts ({entry.file}, key benchmark.prompt_sets is empty)")
    items: list[SuiteItem] = []
    sources = []
    for source in entry.benchmark.prompt_sets:
        path = Path(entry.resolve(source))
        sources.append(str(path))
        items.extend(load_prompt_file(path, code))
    if n is not None:
        items = _round_robin(items, n)
    items = [SuiteItem(index=i, prompt=it.prompt, english=it.english, category=it.category, id=it.id)
             for i, it in enumerate(items)]
    return Suite(name="curated", language=code, items=tuple(items), sources=tuple(sources))


def _round_robin(items: list[SuiteItem], n: int) -> list[SuiteItem]:
    by_category: dict[str, list[SuiteItem]] = {}
    for item in items:
        by_category.setdefault(item.category or "", []).append(item)
    out: list[SuiteItem] = []
    depth = 0
    while len(out) < min(n, len(items)):
        for group in by_category.values():
            if depth < len(group) and len(out) < n:
                out.append(group[depth])
        depth += 1
    return out


# --------------------------------------------------------------------------- snapshots


def suite_lines(suite: Suite) -> list[str]:
    """The JSONL lines of a suite snapshot (one item per line)."""
    return [json.dumps(item.to_dict(), ensure_ascii=False) for item in suite.items]


def write_snapshots(registry: Registry, out_dir: str | Path, codes: Sequence[str] | None = None,
                    overwrite: bool = True) -> list[Path]:
    """Write ``out_dir/<code>/{general,culture}.jsonl`` for ``codes`` (default: every native language with a
    grammar), atomically (the folder is replaced whole)."""
    from polybridge.atomic import atomic_dir
    from polybridge.bench.translate import build_dictionary
    from polybridge.synthetic.captions import load_grammars

    codes = [c for c in (codes or registry.native_codes) if registry.language(c).synthetic is not None]
    grammars = load_grammars(registry, [*codes, registry.backbone().language])
    written = []
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for code in codes:
            dictionary = build_dictionary(grammars[code], grammars[registry.backbone().language])
            for name in SYNTHETIC_SUITES:
                if synthetic_unavailable(registry.language(code), name):
                    continue
                suite = synthetic_suite(registry, code, name, grammars=grammars, dictionary=dictionary)
                (tmp / code).mkdir(exist_ok=True)
                (tmp / code / f"{name}.jsonl").write_text("\n".join(suite_lines(suite)) + "\n", encoding="utf-8")
                written.append(out_dir / code / f"{name}.jsonl")
    return written
