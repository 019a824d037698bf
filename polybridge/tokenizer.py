"""Per-language sentencepiece tokenizers, trained on synthetic captions, loaded with ``AutoTokenizer``.

Training uses sentencepiece (unigram model) on captions from the language's grammar. The result is
saved as a ``tokenizers`` ``tokenizer.json`` (the same unigram vocabulary and scores, identity
normaliser, ``Metaspace`` pre-tokenizer, byte fallback) with a ``tokenizer_config.json`` naming
``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained(folder)`` loads it offline with
no sentencepiece at run time. The sentencepiece model itself is kept beside it (``spm.model``) for
anyone who wants the original, and a test checks that both segment captions identically.

Why ``PreTrainedTokenizerFast`` (an alias of ``TokenizersBackend`` in transformers 5) and not a
model-specific sentencepiece class: in transformers 5 the classes that read a ``.model`` file
(``T5Tokenizer``, ``LlamaTokenizer``, ``XLMRobertaTokenizer``, ...) rebuild their normaliser,
pre-tokenizer and post-processor from hard-coded recipes, each with its own quirks (T5 appends 100
sentinel ``<extra_id_*>`` tokens and has no bos; Llama's ``legacy`` / ``add_prefix_space`` handling
and bos-only default; XLM-R shifts every id by the fairseq offset and normalises with NFKC, which
breaks exact round-trips of full-width CJK punctuation). The generic class loads ``tokenizer.json``
exactly as written, so what we test is what runs, and it resolves the same way in transformers 4.

Properties every tokenizer here has (tests check them for every language on disk):
- identity normalisation: ``decode(encode(caption), skip_special_tokens=True) == caption``;
- byte fallback: characters never seen in training (emoji, other scripts) become byte pieces, not ``<unk>``;
- fixed special ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2 (bos), ``</s>`` 3 (eos); ``encode`` adds bos and eos,
  CLIP-style, so a text encoder can pool at the eos position;
- ``model_max_length`` 64.

Training text marks the boundaries between grammar words (see :data:`WORD_BOUNDARY`), and
sentencepiece's ``pretokenization_delimiter`` keeps every piece inside one word. Without it, Chinese
and Japanese captions (no spaces) yield pieces such as ``紫色大图形`` (colour, size and noun in one
token), so an encoder could not share what it learns about a colour across objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from polybridge.atomic import atomic_dir
from polybridge.errors import PolyBridgeError, PolyBridgeValueError
from polybridge.synthetic.grammar import WORD_BOUNDARY, load_grammar

#: Special tokens and their fixed ids (sentencepiece reserves them first, in this order).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_IDS: dict[str, int] = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
MODEL_MAX_LENGTH = 64
DEFAULT_VOCAB_SIZE = 1000
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
SPM_FILE = "spm.model"
INFO_FILE = "polybridge_tokenizer.json"
REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")
_METASPACE = "\u2581"


class TokenizerError(PolyBridgeError, ValueError):
    """A tokenizer folder is missing, incomplete or unreadable; ``path`` names it."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


# --------------------------------------------------------------------------- training


MAX_PIECE_LENGTH = 16
_WORD = re.compile(f"{_METASPACE}?[^{_METASPACE}]+|{_METASPACE}")


def _is_word_char(ch: str) -> bool:
    return ch.isalpha() or unicodedata.category(ch)[0] == "M"


def seed_pieces(texts: Iterable[str], delimiter: str | None = WORD_BOUNDARY) -> Counter:
    """Every substring (2 to 16 characters) of every word of ``texts``, scored by frequency x length.

    sentencepiece seeds its unigram model with substrings repeated across *distinct* words, so in a
    small, regular language most whole words (``small``, ``black``) never become candidates and
    captions fall apart into letters. Seeding every substring lets EM keep whole words where the
    corpus supports them. Words are split as sentencepiece splits them: at spaces (``▁`` starts a
    word), at ``delimiter``, and between letters and other characters.
    """
    words: Counter = Counter()
    for text in texts:
        text = _METASPACE + text.replace(" ", _METASPACE)
        for chunk in (text.split(delimiter) if delimiter else [text]):
            for word in _WORD.findall(chunk):
                words[word] += 1
    seeds: Counter = Counter()
    for word, freq in words.items():
        # runs of letters (with their marks), each keeping a leading ▁, and runs of anything else
        runs, current = [], ""
        for ch in word:
            if current and ch != _METASPACE and current[-1] != _METASPACE and \
                    _is_word_char(ch) != _is_word_char(current[-1]):
                runs.append(current)
                current = ""
            current += ch
        runs.append(current)
        for run in runs:
            for i in range(len(run)):
                for j in range(i + 2, min(len(run), i + MAX_PIECE_LENGTH) + 1):
                    piece = run[i:j]
                    if _METASPACE not in piece[1:] and not any(c.isdigit() for c in piece):
                        seeds[piece] += freq * len(piece)
    return seeds


def _train_spm(texts: Sequence[str], vocab_size: int, seed: int, delimiter: str | None) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    fd, seed_file = tempfile.mkstemp(prefix="polybridge-seeds-", suffix=".tsv")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for piece, score in sorted(seed_pieces(texts, delimiter).items(), key=lambda kv: (-kv[1], kv[0])):
                fh.write(f"{piece}\t{score}\n")
        return _run_spm_trainer(texts, vocab_size, delimiter, seed_file)
    finally:
        os.unlink(seed_file)


def _run_spm_trainer(texts: Sequence[str], vocab_size: int, delimiter: str | None, seed_file: str) -> bytes:
    import sentencepiece as spm

    buffer = io.BytesIO()
    options: dict[str, Any] = dict(
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,          # a tiny language may have fewer pieces than asked for
        character_coverage=1.0,          # every character of the captions is a piece ...
        byte_fallback=True,              # ... and anything else falls back to bytes, never <unk>
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        pad_id=SPECIAL_IDS[PAD], unk_id=SPECIAL_IDS[UNK], bos_id=SPECIAL_IDS[BOS], eos_id=SPECIAL_IDS[EOS],
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        max_sentence_length=4096,
        max_sentencepiece_length=MAX_PIECE_LENGTH,
        seed_sentencepieces_file=seed_file,
        num_threads=1,                   # the same model on every machine
        minloglevel=2,
    )
    if delimiter:
        options["pretokenization_delimiter"] = delimiter
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buffer, **options)
    # The proto records its training options; drop the temporary seed-file path so that the same
    # texts and seed give byte-identical files.
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    proto.trainer_spec.ClearField("seed_sentencepieces_file")
    return proto.SerializeToString()


def _fast_tokenizer_from_spm(model: bytes):
    """The sentencepiece model as a ``tokenizers.Tokenizer`` that segments exactly as sentencepiece does."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    vocab = [(p.piece, p.score if p.type == pb.ModelProto.SentencePiece.NORMAL else 0.0) for p in proto.pieces]
    for token, index in SPECIAL_IDS.items():
        if vocab[index][0] != token:
            raise RuntimeError(f"sentencepiece put {vocab[index][0]!r} at id {index}, expected {token!r}")
    tok = Tokenizer(Unigram(vocab, unk_id=SPECIAL_IDS[UNK], byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence([
        decoders.Replace(_METASPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),   # the dummy prefix
    ])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, SPECIAL_IDS[BOS]), (EOS, SPECIAL_IDS[EOS])],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    return tok


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    seed: int = 0, info: dict | None = None) -> Path:
    """Train a unigram tokenizer on ``texts`` and write it to ``out_dir`` (atomically); return the folder.

    Texts may contain :data:`WORD_BOUNDARY` between words; pieces never cross it, and it is
    removed from what the tokenizer sees. ``info`` is added to ``polybridge_tokenizer.json``.
    """
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise PolyBridgeValueError("train_tokenizer needs at least one text")
    if vocab_size < len(SPECIAL_IDS) + 256 + 1:
        raise PolyBridgeValueError(f"vocab_size={vocab_size} leaves no room beyond the 4 special and 256 byte pieces")
    has_boundaries = any(WORD_BOUNDARY in t for t in texts)
    model = _train_spm(texts, vocab_size, seed, WORD_BOUNDARY if has_boundaries else None)
    fast = _fast_tokenizer_from_spm(model)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=fast, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH, padding_side="right", truncation_side="right",
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"],
    )
    record = {
        "format": 1,
        "tokenizer_class": TOKENIZER_CLASS,
        "model_type": "unigram",
        "vocab_size": fast.get_vocab_size(),
        "vocab_size_requested": vocab_size,
        "special_tokens": dict(SPECIAL_IDS),
        "model_max_length": MODEL_MAX_LENGTH,
        "seed": seed,
        "n_texts": len(texts),
        "word_boundaries": has_boundaries,
        "sentencepiece_version": _version("sentencepiece"),
        **(info or {}),
    }
    with atomic_dir(out_dir, overwrite=True, mark=True) as tmp:
        hf.save_pretrained(str(tmp))
        (tmp / SPM_FILE).write_bytes(model)
        (tmp / INFO_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _check_config(tmp)
    return Path(out_dir)


def _check_config(folder: Path) -> None:
    """Pin what ``AutoTokenizer`` reads, whatever defaults ``save_pretrained`` wrote."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = TOKENIZER_CLASS
    config["model_max_length"] = MODEL_MAX_LENGTH
    config["clean_up_tokenization_spaces"] = False
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path):
    """The tokenizer in folder ``path`` (``AutoTokenizer``, offline); :class:`TokenizerError` if unusable."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise TokenizerError(path, "no tokenizer here; build one with `polybridge tokenizer build --lang <code>` "
                             "or `python scripts/build_tokenizers.py`")
    if not path.is_dir():
        raise TokenizerError(path, "expected a tokenizer folder (with tokenizer.json), found a file")
    for name in REQUIRED_FILES:
        file = path / name
        if not file.is_file():
            raise TokenizerError(path, f"missing {name}; the folder is incomplete, rebuild it")
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(path, f"{name} is corrupt ({exc}); rebuild the tokenizer") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise TokenizerError(path, f"cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc


def tokenizer_info(path: str | Path) -> dict:
    """The training record (``polybridge_tokenizer.json``) of a tokenizer folder, or {} if there is none."""
    file = Path(path) / INFO_FILE
    if not file.is_file():
        return {}
    return json.loads(file.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- per language


def language_corpus(code: str, grammar_path: str | Path, concepts: Sequence[str], n_captions: int = 20000,
                    seed: int = 0, marked: bool = True) -> list[str]:
    """``n_captions`` captions of random training scenes in language ``code`` (every object drawn).

    With ``marked``, captions carry :data:`WORD_BOUNDARY` between grammar words (for training).
    """
    from polybridge.synthetic.scenes import sample_scenes

    grammar = load_grammar(grammar_path, code, concepts)
    rng = random.Random(f"polybridge-tokenizer:{code}:{seed}")
    out = []
    for scene in sample_scenes(n_captions, seed, split="train"):
        info = grammar.caption_info(scene, rng)
        out.append(info.marked if marked else info.text)
    return out


def build_language_tokenizer(code: str, grammar_path: str | Path, concepts: Sequence[str], out_dir: str | Path,
                             n_captions: int = 20000, seed: int = 0,
                             vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train language ``code``'s tokenizer on ``n_captions`` synthetic captions into ``out_dir``."""
    grammar_path = Path(grammar_path)
    texts = language_corpus(code, grammar_path, concepts, n_captions, seed)
    info = {
        "language": code,
        "n_captions": n_captions,
        "concepts": list(concepts),
        "grammar_sha256": hashlib.sha256(grammar_path.read_bytes()).hexdigest(),
    }
    return train_tokenizer(texts, out_dir, vocab_size=vocab_size, seed=seed, info=info)
