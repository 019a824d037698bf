"""The benchmark suites: synthetic prompt sets (deterministic, with ground truth), the dictionary translation,
the curated MC-18-style prompt files, and the registry fields that name them. No model runs here."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO
from polybridge.bench.suites import (CATEGORIES, SuiteError, culture_scenes, curated_suite, load_prompt_file,
                                     suite_lines, synthetic_suite)
from polybridge.bench.translate import build_dictionary, translation_coverage
from polybridge.registry import RegistryError, load_registry
from polybridge.synthetic.captions import load_grammars
from polybridge.synthetic.scenes import sample_scenes, scene_rng
from polybridge.synthetic.world import CONCEPTS, SHAPES
from polybridge.unicode_scripts import script_of

MC18_LANGUAGES = ("zh", "ja", "ko", "ru", "ar", "es", "hi", "fr", "de")


@pytest.fixture(scope="module")
def registry():
    return load_registry(REPO)


@pytest.fixture(scope="module")
def grammars(registry):
    return load_grammars(registry)


# --------------------------------------------------------------------------- translation


def _facts(scene, own):
    facts = [("background", scene.background)]
    for o in scene.objects:
        shape = o.shape if o.shape in own or o.shape not in CONCEPTS else "object"
        facts += [("shape", shape), ("colour", o.colour), ("size", o.size), ("position", o.position)]
    return facts


def test_dictionary_translation_recovers_every_attribute(registry, grammars):
    """Every fact a native caption states comes out of its word-by-word translation, in every language; a concept
    the language owns comes out as its English word (one the English grammar never writes)."""
    english_words = {w for attr in ("shape",) for k in SHAPES + ("object",) for w in grammars["en"].surface_forms(attr, k)}
    for code in registry.native_codes:
        own = registry.language(code).synthetic.concepts
        dictionary = build_dictionary(grammars[code], grammars["en"])
        scenes = sample_scenes(60, 3, "test", concepts=own)
        captions = [grammars[code].caption(s, scene_rng(3, "test", i, "t")) for i, s in enumerate(scenes)]
        assert translation_coverage(dictionary, captions, [_facts(s, own) for s in scenes]) == 1.0, code
        for concept in own:
            word = concept.replace("_", " ")
            assert word not in english_words
            scene = next(s for s in scenes if any(o.shape == concept for o in s.objects))
            caption = grammars[code].caption(scene, scene_rng(0, "test", 0, "t"))
            assert word in dictionary.translate(caption), (code, caption)


def test_dictionary_matches_whole_words_in_spaced_scripts(grammars):
    de = build_dictionary(grammars["de"], grammars["en"])
    assert de.translate("Ein roter Kreis links auf schwarzem Hintergrund") == \
        "red circle on the left on a black background"
    assert de.translate("Karotte, Brotkorb") == ""  # "rot" inside a word is not the colour
    zh = build_dictionary(grammars["zh"], grammars["en"])
    assert zh.translate("左边有一盏红色的大灯笼") == "on the left red large lantern"  # unspaced: matches anywhere


# --------------------------------------------------------------------------- synthetic suites


def test_synthetic_suites_are_deterministic_prefixes_with_ground_truth(registry):
    full = synthetic_suite(registry, "ja", "culture", n=12)
    short = synthetic_suite(registry, "ja", "culture", n=5)
    assert suite_lines(short) == suite_lines(full)[:5]
    assert suite_lines(synthetic_suite(registry, "ja", "culture", n=12)) == suite_lines(full)
    own = set(registry.language("ja").synthetic.concepts)
    assert all(any(o.shape in own for o in s.objects) for s in full.scenes)
    assert all(o.shape in SHAPES or o.shape in own for s in full.scenes for o in s.objects)
    assert full.has_truth and full.concepts == ("torii", "daruma")
    indices = [i for i, _ in culture_scenes(12, 0, "test", ("torii", "daruma"))]
    assert [item.index for item in full.items] == indices


def test_general_suite_is_the_same_scenes_for_every_language(registry):
    zh = synthetic_suite(registry, "zh", "general", n=8)
    de = synthetic_suite(registry, "de", "general", n=8)
    assert zh.scenes == de.scenes and zh.english == de.english  # english-reference is shared across languages
    assert zh.prompts != de.prompts
    assert all(o.shape in SHAPES for s in zh.scenes for o in s.objects)


def test_suite_snapshot_in_benchmarks_matches_the_generator(registry):
    """benchmarks/synthetic/ is what `python benchmarks/build_suites.py` writes; a grammar change must re-run it."""
    folder = REPO / "benchmarks" / "synthetic"
    files = sorted(folder.glob("*/*.jsonl"))
    assert len(files) == 2 * len(registry.native_codes)
    grammars = load_grammars(registry)
    for file in files:
        code, name = file.parent.name, file.stem
        dictionary = build_dictionary(grammars[code], grammars["en"])
        suite = synthetic_suite(registry, code, name, grammars=grammars, dictionary=dictionary)
        assert file.read_text(encoding="utf-8").splitlines() == suite_lines(suite), \
            f"{file} is stale: run `python benchmarks/build_suites.py`"
        first = json.loads(file.read_text(encoding="utf-8").splitlines()[0])
        assert set(first) == {"index", "prompt", "english", "translation", "scene"}


def test_suite_of_a_language_without_concepts_or_grammar_is_refused(registry):
    with pytest.raises(SuiteError, match="unknown synthetic suite"):
        synthetic_suite(registry, "zh", "curated")
    import dataclasses

    entry = registry.language("zh")
    bare = dataclasses.replace(entry, synthetic=dataclasses.replace(entry.synthetic, concepts=()))
    reg = dataclasses.replace(registry, languages={**registry.languages, "zh": bare})
    with pytest.raises(SuiteError, match="owns no culture-specific concepts"):
        synthetic_suite(reg, "zh", "culture")


# --------------------------------------------------------------------------- curated prompts


@pytest.mark.parametrize("code", MC18_LANGUAGES)
def test_curated_prompt_files_are_native_and_cover_mc18(registry, code):
    entry = registry.language(code)
    assert entry.benchmark.prompt_sets and entry.benchmark.clip_model == "BAAI/AltCLIP-m18"
    suite = curated_suite(registry, code)
    assert len(suite) >= 30
    counts = Counter(item.category for item in suite.items)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 5
    for item in suite.items:
        # Letters are in the language's scripts (marks no script table names, such as the kanji repeat mark, aside).
        scripts = {script_of(ch) for ch in item.prompt if ch.isalpha()} - {None}
        assert scripts and scripts <= set(entry.scripts), (item.id, scripts)
        assert item.english.isascii() or code in ("es", "fr", "de"), item.id  # English with names like Dalí
        assert item.id.startswith(f"{code}-{item.category}-")
    assert len({item.prompt for item in suite.items}) == len(suite)


def test_curated_quick_sample_covers_every_category(registry):
    suite = curated_suite(registry, "fr", n=6)
    assert [item.category for item in suite.items] == list(CATEGORIES)


@pytest.mark.parametrize("body, key", [
    ("language: zh\nprompts:\n  - {id: a, category: poetry, text: 诗, en: poem}\n", "prompts[0].category"),
    ("language: zh\nprompts:\n  - {id: a, category: food, text: 饭, en: rice}\n"
     "  - {id: a, category: food, text: 面, en: noodles}\n", "prompts[1].id"),
    ("language: zh\nprompts:\n  - {id: a, category: food, text: 饭}\n", "prompts[0].en"),
    ("language: ja\nprompts:\n  - {id: a, category: food, text: 饭, en: rice}\n", "language"),
    ("language: zh\nprompts:\n  - {id: a, category: food, text: 饭, en: rice, note: x}\n", "prompts[0].note"),
    ("language: zh\nprompts: []\n", "prompts"),
    ("language: zh\nlanguage: zh\nprompts: []\n", "duplicate key"),
])
def test_bad_prompt_file_names_file_and_key(tmp_path, body, key):
    file = tmp_path / "zh.yaml"
    file.write_text(body, encoding="utf-8")
    with pytest.raises(SuiteError) as err:
        load_prompt_file(file, "zh")
    assert str(file) in str(err.value) and key in str(err.value)


def test_registry_clip_model_is_validated(registry_copy):
    file = Path(registry_copy).parent / "languages/ko/language.yaml"
    text = file.read_text(encoding="utf-8")
    file.write_text(text.replace("clip_model: BAAI/AltCLIP-m18", "clip_model: 'not a model id!'"), encoding="utf-8")
    with pytest.raises(RegistryError, match="benchmark.clip_model"):
        load_registry(registry_copy)
    file.write_text(text.replace("clip_model: BAAI/AltCLIP-m18", "clip_model: null"), encoding="utf-8")
    assert load_registry(registry_copy).language("ko").benchmark.clip_model is None
    file.write_text(text.replace("clip_model:", "clip_modle:"), encoding="utf-8")
    with pytest.raises(RegistryError, match="did you mean 'clip_model'"):
        load_registry(registry_copy)


def test_registry_copy_carries_the_prompt_files(registry_copy):
    reg = load_registry(registry_copy)
    assert math.isfinite(len(curated_suite(reg, "hi")))
    assert (Path(registry_copy).parent / "benchmarks/prompts/hi.yaml").is_file()
