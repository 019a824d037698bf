"""Per-language tokenizers: every languages/*/tokenizer/ on disk loads offline with AutoTokenizer,
round-trips its language's captions exactly, never produces <unk>, and agrees with its sentencepiece
model; training and loading fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from polybridge.synthetic.grammar import grammar_concepts
from polybridge.tokenizer import (
    INFO_FILE,
    MODEL_MAX_LENGTH,
    SPECIAL_IDS,
    SPM_FILE,
    TokenizerError,
    language_corpus,
    load_tokenizer,
    tokenizer_info,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIRS = sorted(p.parent for p in (REPO / "languages").glob("*/tokenizer/tokenizer.json"))
CODES = [p.parent.name for p in TOKENIZER_DIRS]
GRAMMAR_CODES = sorted(p.parent.name for p in (REPO / "languages").glob("*/grammar.yaml"))
UNSEEN = ["🦊 and 🚀", "αβγ δ", "שלום עולם", "ภาษาไทย", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "tab\there", "ｆｕｌｌ－ｗｉｄｔｈ", "ℌ ﬁ ½"]


def concepts_of(code: str) -> tuple[str, ...]:
    entry = REPO / "languages" / code / "language.yaml"
    if entry.is_file():
        synthetic = (yaml.safe_load(entry.read_text(encoding="utf-8")) or {}).get("synthetic") or {}
        if "concepts" in synthetic:
            return tuple(synthetic["concepts"] or ())
    return grammar_concepts(REPO / "languages" / code / "grammar.yaml")


def captions(code: str, n: int = 300, seed: int = 101) -> list[str]:
    """Captions the tokenizer was not trained on (another seed)."""
    return language_corpus(code, REPO / "languages" / code / "grammar.yaml", concepts_of(code), n, seed, marked=False)


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {code: load_tokenizer(path) for code, path in zip(CODES, TOKENIZER_DIRS)}


def test_every_language_with_a_grammar_has_a_tokenizer():
    missing = sorted(set(GRAMMAR_CODES) - set(CODES))
    assert not missing, f"build them: python scripts/build_tokenizers.py --langs {' '.join(missing)}"


@pytest.mark.parametrize("code", CODES)
def test_auto_tokenizer_loads_offline(code, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    folder = REPO / "languages" / code / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert tok.model_max_length == MODEL_MAX_LENGTH
    info = tokenizer_info(folder)
    assert info["language"] == code and info["special_tokens"] == SPECIAL_IDS
    assert len(tok) == info["vocab_size"]
    assert 260 < len(tok) <= 1000
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000


@pytest.mark.parametrize("code", CODES)
def test_trained_on_the_current_grammar(code):
    import hashlib

    info = tokenizer_info(REPO / "languages" / code / "tokenizer")
    grammar = REPO / "languages" / code / "grammar.yaml"
    assert info["grammar_sha256"] == hashlib.sha256(grammar.read_bytes()).hexdigest(), (
        f"languages/{code}/grammar.yaml changed since its tokenizer was built; "
        f"rebuild: python scripts/build_tokenizers.py --langs {code}")


@pytest.mark.parametrize("code", CODES)
def test_captions_round_trip_exactly(code, tokenizers):
    tok = tokenizers[code]
    texts = captions(code)
    batch = tok(texts)["input_ids"]
    for text, ids in zip(texts, batch):
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids, text
        assert all(not 4 <= i < 260 for i in ids), f"caption fell back to bytes: {text}"  # every character is known
        assert len(ids) <= MODEL_MAX_LENGTH, (len(ids), text)
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("code", CODES)
def test_unseen_characters_use_bytes_not_unk(code, tokenizers):
    tok = tokenizers[code]
    other = [captions(c, 3, seed=5)[0] for c in GRAMMAR_CODES if c != code][:4]
    for text in UNSEEN + other:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("code", CODES)
def test_agrees_with_its_sentencepiece_model(code, tokenizers):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(REPO / "languages" / code / "tokenizer" / SPM_FILE))
    tok = tokenizers[code]
    assert sp.get_piece_size() == len(tok)
    for text in captions(code, 200, seed=7) + UNSEEN:
        assert tok(text)["input_ids"][1:-1] == sp.encode(text), text


@pytest.mark.parametrize("code", CODES)
def test_padding_and_truncation(code, tokenizers):
    tok = tokenizers[code]
    out = tok(captions(code, 4) + ["x " * 200], padding="max_length", truncation=True, max_length=MODEL_MAX_LENGTH)
    assert all(len(ids) == MODEL_MAX_LENGTH for ids in out["input_ids"])
    first = out["input_ids"][0]
    n = sum(out["attention_mask"][0])
    assert first[n - 1] == tok.eos_token_id and set(first[n:]) <= {tok.pad_token_id}


# --------------------------------------------------------------------------- training and errors


def test_train_is_atomic_and_deterministic(tmp_path):
    texts = captions("en", 300) if "en" in GRAMMAR_CODES else ["a small red circle on the left"] * 50
    out = tmp_path / "tok"
    train_tokenizer(texts, out, vocab_size=600, seed=0)
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    assert set(first) >= {"tokenizer.json", "tokenizer_config.json", SPM_FILE, INFO_FILE}
    assert json.loads(first["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"
    train_tokenizer(texts, out, vocab_size=600, seed=0)      # rebuild over an existing folder
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first
    tok = load_tokenizer(out)
    assert all(tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t for t in texts)
    with pytest.raises(ValueError):
        train_tokenizer([], out, vocab_size=600)              # a failed build leaves the old one
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary folders left behind


def test_build_script(tmp_path):
    import importlib.util

    if "en" not in GRAMMAR_CODES:
        pytest.skip("needs the English grammar")
    spec = importlib.util.spec_from_file_location("build_tokenizers", REPO / "scripts" / "build_tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    langs = tmp_path / "languages"
    (langs / "en").mkdir(parents=True)
    shutil.copy(REPO / "languages" / "en" / "grammar.yaml", langs / "en" / "grammar.yaml")
    assert module.main(["--languages-dir", str(langs), "--langs", "en", "--n-captions", "200", "--seed", "1"]) == 0
    tok = load_tokenizer(langs / "en" / "tokenizer")
    assert tokenizer_info(langs / "en" / "tokenizer")["n_captions"] == 200
    assert tok.decode(tok("A small red circle")["input_ids"], skip_special_tokens=True) == "A small red circle"
    with pytest.raises(SystemExit):
        module.main(["--languages-dir", str(langs), "--langs", "xx"])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer here") as info:
        load_tokenizer(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "delete-json", "delete-config", "garbage-model"])
def test_damaged_folder_is_a_clear_error(tmp_path, damage):
    source = TOKENIZER_DIRS[0] if TOKENIZER_DIRS else None
    if source is None:
        pytest.skip("no tokenizer built")
    folder = tmp_path / "tok"
    shutil.copytree(source, folder)
    if damage == "truncate":
        data = (folder / "tokenizer.json").read_bytes()
        (folder / "tokenizer.json").write_bytes(data[: len(data) // 2])
    elif damage == "delete-json":
        (folder / "tokenizer.json").unlink()
    elif damage == "delete-config":
        (folder / "tokenizer_config.json").unlink()
    else:
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tokenizer["model"] = {"type": "Unigram", "vocab": "not a vocabulary"}
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(folder)
    assert str(folder) in str(info.value)


def test_a_file_is_not_a_tokenizer(tmp_path):
    file = tmp_path / "tokenizer.json"
    file.write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="found a file"):
        load_tokenizer(file)
