"""Registry parsing: every registered entry, and every way an entry can be wrong."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from polybridge import catalog
from polybridge.registry import (
    FALLBACKS,
    LanguageEntry,
    RegistryError,
    find_registry,
    load_registry,
    resolve_source,
)
from polybridge.synthetic.world import CONCEPTS
from polybridge.unicode_scripts import KNOWN_SCRIPTS

REPO = Path(__file__).resolve().parent.parent
REAL = load_registry(REPO / "registry.yaml")


# --------------------------------------------------------------------------- the real registry


def test_real_registry_has_the_required_languages():
    assert {"en", "zh", "ja", "ko", "ru", "ar", "es", "hi", "fr", "de"} <= set(REAL.codes)
    assert REAL.default_backbone in REAL.backbones
    assert REAL.backbone().language == "en"


@pytest.mark.parametrize("code", REAL.codes)
def test_every_registered_language(code):
    entry = REAL.language(code)
    assert isinstance(entry, LanguageEntry)
    assert entry.code == code == entry.folder.name
    assert entry.file == REPO / "languages" / code / "language.yaml"
    assert entry.scripts and set(entry.scripts) <= set(KNOWN_SCRIPTS)
    assert entry.fallback in FALLBACKS
    if code == REAL.backbone().language:
        assert entry.encoder is None and entry.branch is None
    else:
        assert entry.encoder is not None and entry.branch is not None
        assert entry.branch.type in catalog.names("branch")
        assert entry.data is not None and entry.data.caption_column == f"caption_{code}"
    assert entry.grammar_path is not None and entry.grammar_path.is_file()
    assert set(entry.synthetic.concepts) <= set(CONCEPTS)
    if code != "en":
        assert len(entry.synthetic.concepts) >= 2, "every non-English language owns at least two concepts"


def test_entries_are_frozen():
    entry = REAL.language("zh")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.code = "xx"  # type: ignore[misc]
    with pytest.raises(TypeError):
        REAL.languages["xx"] = entry  # type: ignore[index]


def test_unknown_code_lists_valid_codes():
    with pytest.raises(RegistryError, match=r"unknown language code 'zz'.*valid: en, zh"):
        REAL.language("zz")


def test_sources_local_vs_hub(tmp_path):
    assert resolve_source("./encoder", tmp_path) == (tmp_path / "encoder").resolve()
    assert resolve_source("OFA-Sys/chinese-clip-vit-huge-patch14", tmp_path) == "OFA-Sys/chinese-clip-vit-huge-patch14"
    assert REAL.language("zh").status()["tokenizer"] in ("present", "missing")


def test_find_registry_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYBRIDGE_REGISTRY", str(REPO))
    monkeypatch.chdir(tmp_path)
    assert find_registry() == REPO / "registry.yaml"


# --------------------------------------------------------------------------- a registry to break


def _write_registry(root: Path, top: dict, languages: dict[str, dict]) -> Path:
    (root / "registry.yaml").write_text(yaml.safe_dump(top, allow_unicode=True, sort_keys=False), encoding="utf-8")
    for code, entry in languages.items():
        folder = root / "languages" / code
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "language.yaml").write_text(yaml.safe_dump(entry, allow_unicode=True, sort_keys=False),
                                              encoding="utf-8")
        (folder / "grammar.yaml").write_text("# stand-in: registry parsing does not read grammars\n")
    return root / "registry.yaml"


def _base() -> tuple[dict, dict[str, dict]]:
    top = {
        "version": 1,
        "backbones": {"tiny": {"source": "./model", "architecture": "sd1", "language": "en"}},
        "default_backbone": "tiny",
        "fallback_language": "en",
        "languages": ["en", "zh"],
    }
    en = {"code": "en", "name": "English", "scripts": ["Latin"], "synthetic": {"grammar": "grammar.yaml"},
          "fallback": "backbone"}
    zh = {
        "code": "zh", "name": "Chinese", "scripts": ["Han"],
        "encoder": {"source": "./encoder", "model_class": "CLIPTextModel", "tokenizer": "./tokenizer"},
        "branch": {"type": "bdm", "weights": "./branch", "training": {"learning_rate": 1e-4, "batch_size": 8}},
        "data": {"dataset": "synthetic", "caption_column": "caption_zh", "english_column": "caption_en"},
        "synthetic": {"grammar": "grammar.yaml", "concepts": ["lantern", "pagoda"]},
        "fallback": "zero-branch",
    }
    return top, {"en": en, "zh": zh}


def test_base_registry_loads(tmp_path):
    top, langs = _base()
    reg = load_registry(_write_registry(tmp_path, top, langs))
    assert reg.codes == ("en", "zh")
    zh = reg.language("zh")
    assert zh.branch.training.batch_size == 8 and zh.branch.training.learning_rate == 1e-4
    assert zh.status() == {"tokenizer": "missing", "encoder": "missing", "branch": "missing"}
    assert reg.native_codes == ("zh",)


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()

# (id, which file: "top" or a language code, dotted key, new value, file the error names, key it names, words in it)
BAD_ENTRIES = [
    ("unknown-key", "zh", "colour", "red", "languages/zh/language.yaml", "colour", "unknown key; valid: code, name"),
    ("unknown-nested-key", "zh", "branch.training.lerning_rate", 1e-3, "languages/zh/language.yaml",
     "branch.training.lerning_rate", "did you mean 'learning_rate'"),
    ("wrong-type-int", "zh", "branch.training.batch_size", "eight", "languages/zh/language.yaml",
     "branch.training.batch_size", "expected an integer"),
    ("wrong-type-bool", "zh", "encoder.trust_remote_code", "yes please", "languages/zh/language.yaml",
     "encoder.trust_remote_code", "expected true or false"),
    ("wrong-type-list", "zh", "scripts", "Han", "languages/zh/language.yaml", "scripts", "expected a list of strings"),
    ("wrong-type-mapping", "zh", "encoder", "chinese-clip", "languages/zh/language.yaml", "encoder", "expected a mapping"),
    ("missing-required", "zh", "name", _DELETE, "languages/zh/language.yaml", "name", "required key is missing"),
    ("missing-encoder-class", "zh", "encoder.model_class", _DELETE, "languages/zh/language.yaml",
     "encoder.model_class", "required key is missing"),
    ("unknown-branch-type", "zh", "branch.type", "lora", "languages/zh/language.yaml", "branch.type",
     "unknown branch type 'lora'; valid: bdm, pea"),
    ("unknown-encoder-class", "zh", "encoder.model_class", "CLIPTextModl", "languages/zh/language.yaml",
     "encoder.model_class", "did you mean 'CLIPTextModel'"),
    ("unknown-script", "zh", "scripts", ["Hanzi"], "languages/zh/language.yaml", "scripts[0]", "unknown script 'Hanzi'"),
    ("unknown-fallback", "zh", "fallback", "translate", "languages/zh/language.yaml", "fallback",
     "valid: zero-branch, backbone, error"),
    ("bad-precision", "zh", "branch.training.mixed_precision", "fp8", "languages/zh/language.yaml",
     "branch.training.mixed_precision", "valid: no, fp16, bf16"),
    ("negative-lr", "zh", "branch.training.learning_rate", -1.0, "languages/zh/language.yaml",
     "branch.training.learning_rate", "must be positive"),
    ("bad-dropout", "zh", "branch.training.caption_dropout", 1.5, "languages/zh/language.yaml",
     "branch.training.caption_dropout", "must be in [0, 1)"),
    ("bad-snr-gamma", "zh", "branch.training.snr_gamma", 0, "languages/zh/language.yaml",
     "branch.training.snr_gamma", "must be positive or null"),
    ("code-mismatch", "zh", "code", "ja", "languages/zh/language.yaml", "code", "does not match"),
    ("missing-grammar", "zh", "synthetic.grammar", "nowhere.yaml", "languages/zh/language.yaml", "synthetic.grammar",
     "does not exist"),
    ("missing-prompt-file", "zh", "benchmark", {"prompt_sets": ["prompts/culture.txt"]}, "languages/zh/language.yaml",
     "benchmark.prompt_sets[0]", "does not exist"),
    ("missing-local-dataset", "zh", "data.dataset", "./data/zh", "languages/zh/language.yaml", "data.dataset",
     "does not exist"),
    ("bad-hub-id", "zh", "encoder.source", "not a hub id!", "languages/zh/language.yaml", "encoder.source",
     "neither a hub id"),
    ("encoder-without-branch", "zh", "branch", _DELETE, "languages/zh/language.yaml", "branch",
     "needs both an encoder and a branch"),
    ("unknown-objects", "zh", "data.objects", "mine", "languages/zh/language.yaml", "data.objects", "valid: all, own"),
    ("own-objects-of-a-dataset", "zh", "data", {"dataset": "org/photos", "caption_column": "text", "objects": "own"},
     "languages/zh/language.yaml", "data.objects", "a dataset's images are what they are"),
    ("duplicate-concept", "zh", "synthetic.concepts", ["lantern", "lantern"], "languages/zh/language.yaml",
     "synthetic.concepts", "listed twice"),
    ("duplicate-code", "top", "languages", ["en", "zh", "zh"], "registry.yaml", "languages[2]",
     "duplicate language code 'zh'"),
    ("unregistered-folder", "top", "languages", ["en", "zh", "ko"], "registry.yaml", "languages[2]",
     "polybridge registry add ko"),
    ("bad-code", "top", "languages", ["en", "Chinese"], "registry.yaml", "languages[1]", "not a language code"),
    ("unknown-default-backbone", "top", "default_backbone", "tinyy", "registry.yaml", "default_backbone",
     "did you mean 'tiny'"),
    ("unknown-architecture", "top", "backbones.tiny.architecture", "sdxl3", "registry.yaml",
     "backbones.tiny.architecture", "did you mean 'sdxl'?); valid: sd, sd1, sd2, sdxl"),
    ("unknown-top-key", "top", "langauges", ["en"], "registry.yaml", "langauges", "did you mean 'languages'"),
    ("fallback-not-registered", "top", "fallback_language", "pt", "registry.yaml", "fallback_language",
     "valid: en, zh"),
    ("threshold-out-of-range", "top", "detection_threshold", 3.0, "registry.yaml", "detection_threshold",
     "must be in [0, 1]"),
]


@pytest.mark.parametrize("case", BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES])
def test_bad_entry_names_file_key_and_valid_values(tmp_path, case):
    _id, where, key, value, err_file, err_key, words = case
    top, langs = _base()
    top, langs = copy.deepcopy(top), copy.deepcopy(langs)
    _set(top if where == "top" else langs[where], key, value)
    reg_file = _write_registry(tmp_path, top, langs)
    with pytest.raises(RegistryError) as info:
        load_registry(reg_file)
    err = info.value
    assert err.file.endswith(err_file), str(err)
    assert err.key == err_key, str(err)
    assert words in str(err), str(err)


def test_concept_owned_twice_is_an_error(tmp_path):
    top, langs = _base()
    langs["ja"] = copy.deepcopy(langs["zh"]) | {"code": "ja", "scripts": ["Hiragana"]}
    langs["ja"]["data"]["caption_column"] = "caption_ja"
    top["languages"] = ["en", "zh", "ja"]
    with pytest.raises(RegistryError, match="already owned by 'zh'"):
        load_registry(_write_registry(tmp_path, top, langs))


@pytest.mark.parametrize("text, words", [
    ("languages: [en\n  - zh", "not valid YAML: line"),
    ("version: 1\nversion: 2\n", "duplicate key 'version'"),
    ("- just\n- a list\n", "expected a mapping"),
    ("\x00\x01 binary garbage", "not valid YAML"),
])
def test_corrupted_registry_file(tmp_path, text, words):
    (tmp_path / "registry.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError, match="registry.yaml") as info:
        load_registry(tmp_path)
    assert words in str(info.value)


def test_missing_registry_file(tmp_path):
    with pytest.raises(RegistryError, match="registry file not found"):
        load_registry(tmp_path / "nope.yaml")


def test_numbers_written_without_a_dot_parse_as_floats(tmp_path):
    top, langs = _base()
    reg_file = _write_registry(tmp_path, top, langs)
    text = (tmp_path / "languages/zh/language.yaml").read_text().replace("0.0001", "1e-4")
    (tmp_path / "languages/zh/language.yaml").write_text(text)
    assert load_registry(reg_file).language("zh").branch.training.learning_rate == pytest.approx(1e-4)


def test_one_strict_yaml_loader_for_registry_and_grammars(tmp_path):
    from polybridge.registry import read_yaml
    from polybridge.synthetic import grammar
    from polybridge.synthetic.grammar import GrammarError, load_grammar

    assert grammar.read_yaml is read_yaml  # the grammar reads YAML through the registry's loader
    path = tmp_path / "data.yaml"
    path.write_text("base: &b {red: 1}\nmerged:\n  <<: *b\n  blue: 2\n", encoding="utf-8")
    assert read_yaml(path)["merged"] == {"red": 1, "blue": 2}  # merge keys still work
    path.write_text("a:\n  red: 1\n  <<: {red: 2, blue: 3}\n", encoding="utf-8")
    assert read_yaml(path)["a"] == {"red": 1, "blue": 3}  # a key written here overrides a merged one
    path.write_text("? [a, b]\n: 1\n", encoding="utf-8")
    with pytest.raises(RegistryError, match="not valid YAML"):  # an unhashable key: an error, not a TypeError
        read_yaml(path)
    path.write_text("words: {}\nwords: {}\n", encoding="utf-8")
    with pytest.raises(GrammarError, match="duplicate key 'words' \\(first at line 1\\)") as info:
        load_grammar(path, "en", [])
    assert info.value.key == "(yaml)"
