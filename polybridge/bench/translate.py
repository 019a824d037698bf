"""The ``translate`` baseline: word-by-word dictionary translation of a native prompt into English.

The dictionary is built from the caption grammars themselves (``languages/<code>/grammar.yaml``): every
surface form a language can write for an attribute value (every synonym, every agreement form, every
variant category such as ``background_is``) maps to one English phrase for that value, taken from the
English grammar (shapes, colours and sizes: the word equal to the value's id, ``red``; positions and
backgrounds: the shortest phrase of three words or more naming it, ``on the left``, ``on a black background``).
A culture-specific concept maps to its English *word* (``lantern``, ``onion dome``): a word the English grammar
never writes, so the backbone never learned to draw it, which is what happens to culture-specific words in the
real world.

Translation is greedy longest match, left to right, over the native text (case-folded); words the
dictionary does not hold (particles, articles, verbs, punctuation) are dropped, and the English phrases are
joined in the native word order. A dictionary word written in a cased or spaced script (Latin, Cyrillic,
Devanagari) must stand as a whole word, so ``rot`` never matches inside ``Karotte``; CJK, Hangul and Arabic
text, where particles and clitics attach to the word, matches anywhere. ``translation_coverage`` says how
much of the world's content a dictionary recovers (tested per language).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

from polybridge.synthetic.grammar import ATTRIBUTE_IDS, OBJECT, Grammar
from polybridge.synthetic.world import CONCEPTS

#: Attribute categories a dictionary covers, in the order ties between equal forms are broken.
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "background")

# Scripts whose words must match whole (no clitics attach to them in the grammars).
_WHOLE_WORD_SCRIPTS = ("LATIN", "CYRILLIC", "DEVANAGARI", "GREEK")


def english_phrase(english: Grammar, attribute: str, key: str) -> str:
    """The English phrase for ``attribute`` ``key``: a concept's own word, else the English grammar's form
    equal to the key (``red``, ``circle``) or its shortest form (``on the left``, ``on a black background``)."""
    if attribute == "shape" and key in CONCEPTS:
        return key.replace("_", " ")
    forms = english.surface_forms(attribute, key)
    if attribute in ("shape", "colour", "size") and key in forms:
        return key
    # Positions and backgrounds: a phrase, not the bare word ("on the left", not "left" or "navy blue").
    phrases = [f for f in forms if len(f.split()) >= 3 and key in f.split()] or list(forms)
    return min(phrases, key=lambda s: (len(s), s))


@dataclass(frozen=True)
class Dictionary:
    """A native-to-English dictionary of one language: ``entries`` maps a case-folded native form to
    ``(attribute, key, english phrase)``."""

    code: str
    entries: Mapping[str, tuple[str, str, str]] = field(repr=False)
    longest: int = 0

    def translate(self, text: str) -> str:
        """``text`` word by word in English (see the module docstring)."""
        return " ".join(english for _, _, english in self.lookup(text))

    def lookup(self, text: str) -> list[tuple[str, str, str]]:
        """The dictionary entries found in ``text``, in order: ``[(attribute, key, english), ...]``."""
        folded = text.casefold()
        found = []
        i = 0
        while i < len(folded):
            hit = None
            for end in range(min(len(folded), i + self.longest), i, -1):
                entry = self.entries.get(folded[i:end])
                if entry is not None and _fits(folded, i, end):
                    hit = (end, entry)
                    break
            if hit is None:
                i += 1
                continue
            i, entry = hit
            found.append(entry)
        return found


def _whole_word_script(ch: str) -> bool:
    name = unicodedata.name(ch, "")
    return name.startswith(_WHOLE_WORD_SCRIPTS)


def _fits(text: str, start: int, end: int) -> bool:
    """A match in a whole-word script must not start or end inside a word."""
    if _whole_word_script(text[start]) and start > 0 and text[start - 1].isalnum():
        return False
    if _whole_word_script(text[end - 1]) and end < len(text) and text[end].isalnum():
        return False
    return True


def build_dictionary(native: Grammar, english: Grammar) -> Dictionary:
    """The dictionary of ``native`` into ``english`` (both loaded grammars).

    A form that two values share (rare: a synonym reused across attributes) keeps the first in
    :data:`ATTRIBUTES` order, then id order, so the dictionary is deterministic.
    """
    entries: dict[str, tuple[str, str, str]] = {}
    for attribute in ATTRIBUTES:
        keys = ATTRIBUTE_IDS[attribute]
        if attribute == "shape":
            keys = (*keys, *native.concepts, OBJECT)
        for key in keys:
            english_key = key
            english_form = english_phrase(english, attribute, english_key)
            for form in sorted(native.surface_forms(attribute, key)):
                folded = form.casefold().strip()
                if folded and folded not in entries:
                    entries[folded] = (attribute, key, english_form)
    return Dictionary(native.code, entries, max((len(k) for k in entries), default=0))


def translation_coverage(dictionary: Dictionary, captions: list[str], truths: list[list[tuple[str, str]]]) -> float:
    """Share of the ``(attribute, key)`` facts in ``truths`` (one list per caption) that the translation of
    each caption recovers."""
    hits = total = 0
    for caption, facts in zip(captions, truths, strict=True):
        got = {(a, k) for a, k, _ in dictionary.lookup(caption)}
        hits += sum(1 for fact in facts if fact in got)
        total += len(facts)
    return hits / total if total else float("nan")
