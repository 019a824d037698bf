"""Seed words: each language's list of frequent prompt words, which the router has lingua score when it loads.

A language's list is data: ``languages/<code>/seed_words.txt``, named by its entry's ``detection.seed_words`` and
read and checked by the registry (:func:`polybridge.registry.read_word_list`). This module makes it from the
project's own sources (``python scripts/build_seed_words.py``; ``polybridge registry add`` for a new language):

1. ``prompt_words.txt`` in the language's folder, when there is one: frequent words of image prompts written by
   hand (function words, common subjects, colours, styles, prompt tags; en, es, fr and de have one);
2. the language's caption grammar (``synthetic.grammar``): every word it may write (:meth:`Grammar.texts`).

Both are read as the router reads prompts (:func:`polybridge.router.scorer_words`). The list holds each word
once: those of ``prompt_words.txt`` in its order, then the grammar's others in sorted order, so the same sources
always make the same file. A new language, whatever its script, gets a list from its grammar with no code.
Seed words change how fast prompts route, never where (their scores are lingua's; tested).
"""

from __future__ import annotations

from pathlib import Path

from polybridge.registry import LanguageEntry, RegistryError, is_list_word
from polybridge.router import scorer_words
from polybridge.synthetic.grammar import Grammar, load_grammar

#: The hand-written source of a language's seed words, in its folder (optional).
PROMPT_WORDS_FILE = "prompt_words.txt"
#: Where ``polybridge registry add`` puts a new language's list (its entry's ``detection.seed_words``).
SEED_WORDS_FILE = "seed_words.txt"


def prompt_words(folder: Path) -> tuple[str, ...]:
    """The words of ``folder/prompt_words.txt`` (lines starting with ``#`` are comments); none without one."""
    path = Path(folder) / PROMPT_WORDS_FILE
    if not path.is_file():
        return ()
    lines = path.read_text(encoding="utf-8").splitlines()
    return scorer_words(line for line in lines if not line.lstrip().startswith("#"))


def render_seed_words(code: str, name: str, folder: Path, grammar: Grammar | None) -> str:
    """The text of the seed-word list of language ``code`` from its sources (the folder's hand-written
    ``prompt_words.txt`` and ``grammar``'s words), header included."""
    sections: list[tuple[str, tuple[str, ...]]] = []
    hand = prompt_words(folder)
    if hand:
        sections.append((f"{PROMPT_WORDS_FILE} (written by hand)", hand))
    if grammar is not None:
        own = sorted(set(scorer_words(grammar.texts())).difference(hand))
        sections.append((f"{grammar.path.name} (the words the caption grammar may write"
                         f"{'; those not above' if hand else ''})", tuple(own)))
    lines = [
        f"# Seed words of {name} ({code}): frequent words of its prompts, which the router has lingua score when it",
        "# loads, so that routing rarely waits for lingua; they change how fast prompts route, never where.",
        "# One word a line, as the router reads prompts (NFC, lowercase letters). Made by",
        f"# `python scripts/build_seed_words.py --langs {code}` from the sources named below: edit those and run",
        "# it again, not this file.",
    ]
    for title, words in sections:
        kept = [w for w in words if is_list_word(w)]  # letters the router reads but the list format does not
        lines += ["", f"# {title}: {len(kept):,} words", *kept]
    return "\n".join(lines) + "\n"


def entry_seed_words(entry: LanguageEntry) -> tuple[Path, str]:
    """Where ``entry``'s seed-word list goes (its ``detection.seed_words``) and what it should hold."""
    if entry.detection.seed_words is None:
        raise RegistryError(entry.file, "detection.seed_words", "not given, so this language has no seed-word list; "
                            f"add `detection: {{seed_words: {SEED_WORDS_FILE}}}` to write one")
    grammar = None
    if entry.synthetic is not None:
        grammar = load_grammar(entry.grammar_path, entry.code, entry.synthetic.concepts)
    text = render_seed_words(entry.code, entry.name, entry.folder, grammar)
    return Path(entry.resolve(entry.detection.seed_words)), text

