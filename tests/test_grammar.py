"""Caption grammars: every languages/*/grammar.yaml on disk is loaded and exercised (a new language
is tested with no change here), and broken grammars fail with errors that name the file and key."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

from polybridge.synthetic.grammar import (
    WORD_BOUNDARY,
    Grammar,
    GrammarError,
    caption_mixed,
    caption_mixed_info,
    grammar_concepts,
    load_grammar,
)
from polybridge.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    OBJECTS,
    POSITION_PAIRS,
    POSITIONS,
    SIZES,
    Scene,
    SceneObject,
)

REPO = Path(__file__).resolve().parent.parent
GRAMMAR_FILES = sorted((REPO / "languages").glob("*/grammar.yaml"))
CODES = [p.parent.name for p in GRAMMAR_FILES]
N_SCENES = 200
CJK_PUNCT = "，。、；：！？）」』"


def declared_concepts(code: str) -> tuple[str, ...]:
    """What the registry entry says the language owns; the grammar's own list where there is no entry yet."""
    entry = REPO / "languages" / code / "language.yaml"
    if entry.is_file():
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        synthetic = data.get("synthetic") or {}
        if "concepts" in synthetic:
            return tuple(c for c in CONCEPTS if c in set(synthetic["concepts"] or ()))
    return grammar_concepts(REPO / "languages" / code / "grammar.yaml")


@pytest.fixture(scope="module")
def grammars() -> dict[str, Grammar]:
    return {code: load_grammar(path, code, declared_concepts(code)) for code, path in zip(CODES, GRAMMAR_FILES)}


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """A scene over every object of the world (the tests' own sampler: every concept must show up)."""
    n = n_objects or rng.choice((1, 2))
    positions = [rng.choice(tuple(POSITIONS))] if n == 1 else list(rng.choice(POSITION_PAIRS))
    rng.shuffle(positions)
    objects = tuple(SceneObject(rng.choice(OBJECTS), rng.choice(tuple(COLOURS)), rng.choice(SIZES), p)
                    for p in positions)
    return Scene(background=rng.choice(tuple(BACKGROUNDS)), objects=objects)


def scenes(n: int = N_SCENES, seed: int = 0, n_objects: int | None = None) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, n_objects) for _ in range(n)]


def mentions(caption: str, grammar: Grammar, attribute: str, key: str) -> bool:
    caption = caption.casefold()  # a caption may start with a capitalised word
    return any(form.casefold() in caption for form in grammar.surface_forms(attribute, key))


def test_every_language_folder_has_a_grammar():
    assert len(CODES) >= 10, CODES
    assert {"en", "zh", "ja", "ko", "ru", "ar", "es", "hi", "fr", "de"} <= set(CODES)


# --------------------------------------------------------------------------- every grammar on disk


@pytest.mark.parametrize("code", CODES)
def test_loads_and_owns_what_the_registry_says(code, grammars):
    grammar = grammars[code]
    assert grammar.code == code
    assert grammar.concepts == declared_concepts(code)
    assert grammar_concepts(grammar.path) == grammar.concepts  # the grammar names exactly its own concepts
    for kind in ("object", "scene1", "scene2"):
        assert sum(name.startswith(kind + "[") for name in grammar.template_names) >= 3


@pytest.mark.parametrize("code", CODES)
def test_captions_state_every_attribute(code, grammars):
    grammar = grammars[code]
    rng = random.Random(1)
    for scene in scenes():
        caption = grammar.caption(scene, rng)
        assert caption and caption == caption.strip()
        assert mentions(caption, grammar, "background", scene.background), (caption, scene)
        for obj in scene.objects:
            for attribute in ("shape", "colour", "size", "position"):
                assert mentions(caption, grammar, attribute, getattr(obj, attribute)), (attribute, caption, obj)


@pytest.mark.parametrize("code", CODES)
def test_each_object_phrase_states_its_attributes(code, grammars):
    grammar = grammars[code]
    rng = random.Random(2)
    for scene in scenes(100):
        for obj in scene.objects:
            text = grammar.describe_object(obj, rng)
            for attribute in ("shape", "colour", "size", "position"):
                assert mentions(text, grammar, attribute, getattr(obj, attribute)), (attribute, text, obj)


@pytest.mark.parametrize("code", CODES)
def test_concepts_named_only_by_their_owner(code, grammars):
    grammar = grammars[code]
    foreign = {  # concept -> the words its owner uses for it
        concept: other.surface_forms("shape", concept)
        for other in grammars.values() if other is not grammar for concept in other.concepts
    }
    own_seen = set()
    rng = random.Random(3)
    for scene in scenes(400):
        caption = grammar.caption(scene, rng)
        for obj in scene.objects:
            if obj.shape in grammar.concepts:
                own_seen.add(obj.shape)
                assert mentions(caption, grammar, "shape", obj.shape), (obj.shape, caption)
        for concept, words in foreign.items():
            assert not any(w in caption for w in words), (concept, caption)
    assert own_seen == set(grammar.concepts)
    for concept in CONCEPTS:
        if concept not in grammar.concepts:
            assert grammar.noun_key(concept) == "object"


@pytest.mark.parametrize("code", CODES)
def test_templates_vary(code, grammars):
    grammar = grammars[code]
    rng = random.Random(4)
    used = set()
    for scene in scenes(1000):
        used.update(grammar.caption_info(scene, rng).templates)
    for kind in ("object", "scene1", "scene2"):
        kind_used = {t for t in used if t.startswith(kind + "[")}
        assert len(kind_used) >= 3, (kind, kind_used)
    unused = set(grammar.template_names) - used
    assert not unused, f"templates never reachable (no frame accepts their form?): {sorted(unused)}"


@pytest.mark.parametrize("code", CODES)
def test_deterministic_given_seed(code, grammars):
    grammar = grammars[code]
    sample = scenes(50, seed=5)
    first = [grammar.caption(s, random.Random(i)) for i, s in enumerate(sample)]
    again = [grammar.caption(s, random.Random(i)) for i, s in enumerate(sample)]
    other = [grammar.caption(s, random.Random(i + 1000)) for i, s in enumerate(sample)]
    assert first == again
    assert first != other
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert [grammar.caption(s, rng_a) for s in sample] == [grammar.caption_info(s, rng_b).text for s in sample]


@pytest.mark.parametrize("code", CODES)
def test_clean_text(code, grammars):
    grammar = grammars[code]
    rng = random.Random(6)
    for scene in scenes():
        info = grammar.caption_info(scene, rng)
        text = info.text
        assert "  " not in text and text == text.strip(), repr(text)
        assert not re.search(f" [{CJK_PUNCT},.]", text), repr(text)
        assert not re.search(f"[{CJK_PUNCT}] ", text), repr(text)
        assert not any(ord(c) < 32 or c in "\u200e\u200f\u202a\u202b\u202c\u202d\u202e" for c in text), repr(text)
        assert info.marked.replace(WORD_BOUNDARY, "") == text
        assert f"{WORD_BOUNDARY} " not in info.marked and f" {WORD_BOUNDARY}" not in info.marked


@pytest.mark.parametrize("code", CODES)
def test_mixed_captions_carry_both_languages(code, grammars):
    if len(CODES) < 2:
        pytest.skip("needs two languages")
    partner = CODES[(CODES.index(code) + 1) % len(CODES)]
    first, second = grammars[code], grammars[partner]
    rng = random.Random(7)
    for scene in scenes(60, seed=8, n_objects=2):
        info = caption_mixed_info(scene, [first, second], rng)
        text = info.text
        a, b = scene.objects
        assert mentions(text, first, "colour", a.colour) and mentions(text, first, "position", a.position), text
        assert mentions(text, second, "colour", b.colour) and mentions(text, second, "position", b.position), text
        assert mentions(text, second, "shape", b.shape), text
        assert mentions(text, first, "background", scene.background), text
        assert any(t.startswith(f"{partner}:object[") for t in info.templates), info.templates
    one = scenes(1, seed=9, n_objects=1)[0]
    assert caption_mixed(one, [first], random.Random(0)) == first.caption(one, random.Random(0))


# --------------------------------------------------------------------------- engine behaviour


def test_english_articles_and_concepts(grammars):
    en = grammars["en"]
    rng = random.Random(10)
    for scene in scenes(300):
        text = en.caption(scene, rng)
        assert not re.search(r"\ba [aeiou]", text, re.I), text
        assert not re.search(r"\ban [^aeiou\W]", text, re.I), text
    lantern = Scene("black", (SceneObject("lantern", "red", "large", "left"),))
    texts = {en.caption(lantern, random.Random(i)) for i in range(30)}
    assert not any("lantern" in t for t in texts)
    assert any("red" in t and "left" in t for t in texts)


def test_measure_words_and_particles(grammars):
    zh, ko = grammars["zh"], grammars["ko"]
    lantern = Scene("black", (SceneObject("lantern", "red", "large", "left"),))
    pagoda = Scene("black", (SceneObject("pagoda", "red", "large", "left"),))
    assert all("一盏" in zh.caption(lantern, random.Random(i)) for i in range(20))
    assert all("一座" in zh.caption(pagoda, random.Random(i)) for i in range(20))
    rng = random.Random(11)
    for scene in scenes(300):
        text = ko.caption(scene, rng)
        # after a closed syllable 이/과, after an open one 가/와 (a wrong pairing reads as a typo)
        for m in re.finditer(r"([가-힣])(이|가|과|와)(?=[\s.,])", text):
            closed = (ord(m.group(1)) - 0xAC00) % 28 != 0
            assert (m.group(2) in "이과") == closed or m.group(1) + m.group(2) in text.split(), (m.group(0), text)


def test_agreement(grammars):
    es, de, ru = grammars["es"], grammars["de"], grammars["ru"]
    star = Scene("black", (SceneObject("star", "red", "small", "top"),))
    for i in range(20):
        text = es.caption(star, random.Random(i))
        assert "estrella" in text and "pequeño" not in text, text
        assert not re.search(r"(?<!color )rojo", text), text  # "de color rojo" agrees with "color"
        assert "звезда" in ru.caption(star, random.Random(i))
        assert "красный" not in ru.caption(star, random.Random(i))
    circle = Scene("black", (SceneObject("circle", "red", "large", "left"),))
    texts = {de.caption(circle, random.Random(i)) for i in range(60)}
    assert any("einen großen roten Kreis" in t for t in texts)   # accusative after "es gibt" / "zeigt"
    assert any("ein großer roter Kreis" in t for t in texts)      # nominative
    assert any("einem großen roten Kreis" in t for t in texts)    # dative after "mit"
    assert not any("einen großer" in t or "ein großen" in t for t in texts)


def test_rejects_scenes_it_cannot_caption(grammars):
    en = grammars["en"]
    with pytest.raises(ValueError, match="1 or 2 objects"):
        en.caption(Scene("black", ()), random.Random(0))
    with pytest.raises(ValueError, match="did you mean 'purple'"):
        en.caption(Scene("black", (SceneObject("circle", "purpel", "small", "left"),)), random.Random(0))
    with pytest.raises(ValueError, match="background 'pink'"):
        en.caption(Scene("pink", (SceneObject("circle", "red", "small", "left"),)), random.Random(0))
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        en.describe_object(SceneObject("hexagon", "red", "small", "left"), random.Random(0))


# --------------------------------------------------------------------------- broken grammars


def _base() -> dict:
    return yaml.safe_load((REPO / "languages" / "en" / "grammar.yaml").read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: dict | str, name: str = "grammar.yaml") -> Path:
    path = tmp_path / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def _fails(path: Path, key: str, *words: str, code: str = "en", concepts=()) -> GrammarError:
    with pytest.raises(GrammarError) as info:
        load_grammar(path, code, concepts)
    err = info.value
    assert str(path) in str(err) and err.path == str(path)
    assert err.key == key, str(err)
    for word in words:
        assert word in str(err), str(err)
    assert isinstance(err, ValueError)
    return err


def test_base_grammar_is_valid(tmp_path):
    load_grammar(_write(tmp_path, _base()), "en", [])


def test_missing_colour(tmp_path):
    data = _base()
    del data["words"]["colour"]["red"]
    _fails(_write(tmp_path, data), "words.colour.red", "missing", "purple")


def test_unknown_colour_suggests(tmp_path):
    data = _base()
    data["words"]["colour"]["purpel"] = data["words"]["colour"].pop("purple")
    _fails(_write(tmp_path, data), "words.colour.purpel", "did you mean 'purple'")


def test_unknown_slot(tmp_path):
    data = _base()
    data["templates"]["object"][0] = "{article.a} {size} {colur} {shape} {position}"
    _fails(_write(tmp_path, data), "templates.object[0]", "colur", "did you mean 'colour'")


def test_unknown_function_word_key(tmp_path):
    data = _base()
    data["templates"]["object"][1] = "{num.once} {size} {colour} {shape} {position}"
    _fails(_write(tmp_path, data), "templates.object[1]", "did you mean 'one'")


def test_template_missing_an_attribute(tmp_path):
    data = _base()
    data["templates"]["object"][0] = "{article.a} {colour} {shape} {position}"
    _fails(_write(tmp_path, data), "templates.object[0]", "{size}", "missing")


def test_missing_agreement_form(tmp_path):
    data = yaml.safe_load((REPO / "languages" / "es" / "grammar.yaml").read_text(encoding="utf-8"))
    del data["words"]["colour"]["red"]["f"]
    err = _fails(_write(tmp_path, data), "words.colour.red", "gender='f'", code="es", concepts=("fan", "guitar"))
    assert "m" in str(err)


def test_agreement_feature_no_noun_has(tmp_path):
    data = _base()
    data["words"]["colour"]["red"] = {"m": "red", "f": "red"}
    _fails(_write(tmp_path, data), "words.colour.red", "cannot tell which feature")


def test_unknown_concept(tmp_path):
    _fails(_write(tmp_path, _base()), "concepts", "lantren", "did you mean 'lantern'", concepts=("lantren",))


def test_concept_not_owned(tmp_path):
    data = _base()
    data["words"]["shape"]["lantern"] = "lantern"
    _fails(_write(tmp_path, data), "words.shape.lantern", "does not own")


def test_owned_concept_without_a_word(tmp_path):
    _fails(_write(tmp_path, _base()), "words.shape.lantern", "missing", concepts=("lantern",))


def test_too_few_templates(tmp_path):
    data = _base()
    data["templates"]["scene1"] = data["templates"]["scene1"][:2]
    _fails(_write(tmp_path, data), "templates.scene1", "at least 3")


def test_malformed_yaml(tmp_path):
    path = _write(tmp_path, "words:\n  colour: [red\ntemplates: {}\n")
    _fails(path, "(yaml)", "not valid YAML", "line")


def test_duplicate_key(tmp_path):
    text = (REPO / "languages" / "en" / "grammar.yaml").read_text(encoding="utf-8")
    text = text.replace("    red: red\n", "    red: red\n    red: crimson\n")
    _fails(_write(tmp_path, text), "(yaml)", "duplicate key 'red'")


def test_unknown_top_level_key(tmp_path):
    data = _base()
    data["tempaltes"] = data.pop("templates")
    _fails(_write(tmp_path, data), "tempaltes", "did you mean 'templates'")


def test_unknown_object_form(tmp_path):
    data = _base()
    data["templates"]["scene1"][1]["objects"] = ["nounphrase"]
    _fails(_write(tmp_path, data), "templates.scene1[1].objects", "nounphrase", "np")


def test_language_mismatch(tmp_path):
    _fails(_write(tmp_path, _base()), "language", "'en'", code="xx")


def test_direction_marks_rejected(tmp_path):
    data = _base()
    data["words"]["colour"]["red"] = "\u200fred"
    _fails(_write(tmp_path, data), "words.colour.red", "U+200F")


def test_missing_file(tmp_path):
    with pytest.raises(GrammarError, match="file not found"):
        load_grammar(tmp_path / "nope.yaml", "en", [])
