"""Captions for scenes in registered languages: the registry's grammars, loaded once.

The grammars themselves are data (``languages/<code>/grammar.yaml``, read by ``grammar.py``);
this module connects them to the registry, which says where each grammar lives and which
culture-specific concepts each language owns.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from polybridge.registry import Registry, RegistryError
from polybridge.synthetic.grammar import Grammar, caption_mixed, load_grammar
from polybridge.synthetic.world import Scene

CaptionFn = Callable[[Scene, str, random.Random], str]


def load_grammars(registry: Registry, codes: Sequence[str] | None = None) -> dict[str, Grammar]:
    """Grammars of ``codes`` (default: every language that has one), validated against the world."""
    codes = list(registry.codes if codes is None else codes)
    grammars = {}
    for code in codes:
        entry = registry.language(code)
        if entry.synthetic is None:
            continue
        grammars[code] = load_grammar(entry.grammar_path, code, entry.synthetic.concepts)
    return grammars


class Captioner:
    """Captions scenes in registered languages; ``captioner(scene, lang, rng)``.

    With ``mix=[a, b]``, two-object scenes are captioned with object 1 in ``a`` (which also gives
    the frame and background) and object 2 in ``b``; one-object scenes stay in ``a``.
    """

    def __init__(self, registry: Registry, codes: Sequence[str]):
        missing = [c for c in codes if registry.language(c).synthetic is None]
        if missing:
            raise RegistryError(registry.language(missing[0]).file, "synthetic",
                                f"language {missing[0]!r} has no grammar, so it cannot caption scenes")
        self.grammars = load_grammars(registry, codes)

    def __call__(self, scene: Scene, lang: str, rng: random.Random) -> str:
        return self.grammars[lang].caption(scene, rng)

    def for_languages(self, langs: Sequence[str]) -> CaptionFn:
        """A caption function for ``render_to_dir``: plain for one language, mixed for two or more."""
        if len(langs) <= 1:
            return self
        grammars = [self.grammars[c] for c in langs]

        def mixed(scene: Scene, lang: str, rng: random.Random) -> str:
            if len(scene.objects) < 2:
                return grammars[0].caption(scene, rng)
            return caption_mixed(scene, grammars[: len(scene.objects)], rng)

        return mixed
