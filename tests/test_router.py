"""The router: script rules, the Latin-script detector, spans of mixed prompts, fallbacks, bad input,
accuracy on the hand-written prompt set (tests/data/router_prompts.tsv), and its fast paths (batches, seed
words, ASCII prompts), which must give the same plans as the plain path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from polybridge.registry import load_registry
from polybridge.router import (HOW, PARALLEL_MIN, Router, WordScorer, expected_spans, format_scores,
                               read_route_set, score_routes, scorer_words)
from polybridge.unicode_scripts import SCRIPT_RANGES

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "tests" / "data" / "router_prompts.tsv"
REGISTERED = ("en", "zh", "ja", "ko", "ru", "ar", "es", "hi", "fr", "de")
LATIN = ("en", "es", "fr", "de")


@pytest.fixture(scope="module")
def registry():
    return load_registry(REPO)


@pytest.fixture(scope="module")
def router(registry):
    return Router.from_registry(registry)


def spans(router: Router, prompt: str) -> list[tuple[str, str]]:
    return [(s.language, s.text) for s in router.plan(prompt).spans]


# --------------------------------------------------------------------------- the hand-written set


def test_prompt_set_is_big_and_covers_every_language():
    rows = read_route_set(PROMPTS)
    single = [e for e, _ in rows if ":" not in e]
    mixed = [e for e, _ in rows if ":" in e]
    assert len(rows) >= 300 and len(mixed) >= 40
    assert set(single) == set(REGISTERED)
    assert all(single.count(code) >= 20 for code in REGISTERED)
    # one- and two-word prompts of every Latin-script language, and mixed prompts with two native languages
    words = {code: sorted(len(p.split()) for e, p in rows if e == code) for code in ("en", "es", "fr", "de")}
    assert all(w[0] == 1 and w.count(2) >= 3 for w in words.values()), words
    natives = [e for e in mixed if len({c for c, _ in expected_spans(e)} - {"en"}) >= 2]
    assert len(natives) >= 5
    for expected in mixed:  # every expected span names a registered language and a text
        assert all(code in REGISTERED and text for code, text in expected_spans(expected)), expected
    assert len({p for _, p in rows}) == len(rows), "a prompt is listed twice"


def test_accuracy_on_the_hand_written_set(router, capsys):
    scores = score_routes(router, read_route_set(PROMPTS))
    with capsys.disabled():
        print("\n" + format_scores(scores))  # the per-language report (shown with or without -s)
    assert scores["single"]["accuracy"] >= 0.98, format_scores(scores)
    assert scores["mixed"]["accuracy"] >= 0.95, format_scores(scores)
    # Every script-ruled language is perfect: their errors could only be bugs.
    for code in ("zh", "ja", "ko", "ru", "ar", "hi"):
        assert scores["per_language"][code]["accuracy"] == 1.0, format_scores(scores)


# --------------------------------------------------------------------------- the issue's examples


@pytest.mark.parametrize("prompt, expected", [
    ("a cyberpunk city with 灯笼 in the street", [("en", "a cyberpunk city with"), ("zh", "灯笼"), ("en", "in the street")]),
    ("masterpiece, best quality, 山水画", [("en", "masterpiece, best quality"), ("zh", "山水画")]),
    ("桜の木, anime style", [("ja", "桜の木"), ("en", "anime style")]),
])
def test_issue_examples(router, prompt, expected):
    assert spans(router, prompt) == expected


def test_plan_texts_and_targets(router):
    plan = router.plan("a cyberpunk city with 灯笼 in the street")
    assert plan.backbone_text == "a cyberpunk city with in the street"
    assert dict(plan.branch_texts) == {"zh": "灯笼"}
    assert [s.target for s in plan.spans] == ["backbone", "branch", "backbone"]
    assert plan.label == "en+zh" and plan.is_mixed
    plan = router.plan("月亮 over the sea, 油画")
    assert dict(plan.branch_texts) == {"zh": "月亮, 油画"} and plan.backbone_text == "over the sea"
    # A single-language prompt goes on exactly as written.
    assert router.plan("  一只猫坐在窗台上 ").branch_texts == {"zh": "  一只猫坐在窗台上 "}
    assert router.plan("a red car.").backbone_text == "a red car."
    # Two native languages: each branch gets its own text.
    plan = router.plan("красный фонарь, 赤い提灯, night")
    assert dict(plan.branch_texts) == {"ru": "красный фонарь", "ja": "赤い提灯"} and plan.backbone_text == "night"
    d = plan.to_dict()
    assert d["label"] == "ru+ja+en" and d["spans"][1] == {
        "text": "赤い提灯", "start": 16, "end": 20, "language": "ja", "confidence": 1.0, "how": "script",
        "target": "branch", "detected": None, "trained": plan.spans[1].trained}
    assert plan.prompt[16:20] == "赤い提灯"


# --------------------------------------------------------------------------- script rules


def test_script_rules(router):
    plan = router.plan("桜の木")
    assert [(s.language, s.how, s.confidence) for s in plan.spans] == [("ja", "script", 1.0)]
    for prompt, code in [("고양이", "ko"), ("кот", "ru"), ("قطة", "ar"), ("बिल्ली", "hi"), ("カメラ", "ja")]:
        (span,) = router.plan(prompt).spans
        assert (span.language, span.how, span.confidence) == (code, "script", 1.0)
    # Han alone is Chinese (the language written in the fewest scripts) ...
    (span,) = router.plan("山水画").spans
    assert (span.language, span.how, span.confidence) == ("zh", "script+fewest", 0.8)
    # ... unless kana elsewhere in the prompt says Japanese (the nearest such script wins).
    plan = router.plan("少女, 長い髪, white dress, 花畑")
    assert [(s.language, s.how) for s in plan.spans] == [("ja", "script"), ("en", "detector"), ("ja", "script+context")]
    # Number tags and short capitals carry no language: they stay with the text around them.
    assert spans(router, "高清 4K 壁纸") == [("zh", "高清 4K 壁纸")]
    assert spans(router, "CG插画") == [("zh", "CG插画")]
    assert spans(router, "зимний лес, 4k, highly detailed") == [("ru", "зимний лес"), ("en", "4k, highly detailed")]
    assert spans(router, "山水画, 8k, 水墨") == [("zh", "山水画, 8k, 水墨")]
    # Fullwidth Latin letters are Latin.
    assert router.plan("ＡＢＣ").spans[0].how != "fallback:unknown-script"


def test_only_registered_languages_are_returned(router):
    for prompt in ("Guten Morgen", "bom dia, gato preto", "dobrý den", "una gata nera sul tetto", "Καλημέρα", "สวัสดี"):
        assert all(s.language in REGISTERED for s in router.plan(prompt).spans), prompt


def test_latin_detector_and_chunk_split(router):
    assert spans(router, "un château sous la neige, cinematic lighting") == [
        ("fr", "un château sous la neige"), ("en", "cinematic lighting")]
    assert spans(router, "Porträt einer Frau, weiches Licht, dunkler Hintergrund") == [
        ("de", "Porträt einer Frau, weiches Licht, dunkler Hintergrund")]
    (span,) = router.plan("una ciudad futurista bajo la lluvia").spans
    assert span.how == "detector" and span.language == "es" and span.confidence > 0.9


# --------------------------------------------------------------------------- fallbacks


def test_unsure_detection_falls_back(router):
    (span,) = router.plan("xyz").spans
    assert span.how == "fallback:unsure" and span.language == "en" and span.confidence < 0.5
    assert span.detected in REGISTERED and span.target == "backbone"
    strict = Router({"en": ["Latin"], "fr": ["Latin"], "ru": ["Cyrillic"]}, threshold=1.0)
    (span,) = strict.plan("un chat noir sur le toit").spans
    assert (span.language, span.detected, span.how) == ("en", "fr", "fallback:unsure")
    # A fallback language other than the backbone's: its route applies.
    other = Router({"en": ["Latin"], "fr": ["Latin"], "ru": ["Cyrillic"]}, fallback_language="ru", threshold=1.0)
    (span,) = other.plan("un chat noir").spans
    assert (span.language, span.target) == ("ru", "branch")


def test_untrained_languages_follow_their_fallback(registry):
    router = Router.from_registry(registry, routes={"ko": "backbone", "ru": "error"}, untrained=["zh", "ko", "ru"])
    (zh,) = router.plan("山水画").spans
    assert (zh.target, zh.trained) == ("branch", False)  # zero-branch: the (untrained) branch runs
    plan = router.plan("한복, красный фонарь")
    assert [(s.language, s.target) for s in plan.spans] == [("ko", "backbone"), ("ru", "error")]
    assert plan.backbone_text == "한복" and dict(plan.branch_texts) == {}
    assert [s.language for s in plan.problems()] == ["ru"]


def test_registry_targets(tmp_path):
    from conftest import copy_registry

    reg = load_registry(copy_registry(tmp_path / "r"))  # no built weights: every branch untrained
    for code, fallback in (("ko", "backbone"), ("ru", "error")):
        path = tmp_path / "r" / "languages" / code / "language.yaml"
        path.write_text(path.read_text(encoding="utf-8").replace("fallback: zero-branch", f"fallback: {fallback}"),
                        encoding="utf-8")
    router = Router.from_registry(load_registry(tmp_path / "r"))
    assert router.routes["en"] == "backbone" and router.routes["zh"] == "branch" and "zh" in router.untrained
    assert router.routes["ko"] == "backbone" and router.routes["ru"] == "error"
    assert router.threshold == reg.detection_threshold and router.fallback_language == reg.fallback_language


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n ", ",,, ;;", "\x00\x01"])
def test_empty_prompts_have_no_spans(router, prompt):
    plan = router.plan(prompt)
    assert plan.spans == () and plan.backbone_text == "" and dict(plan.branch_texts) == {}
    assert plan.label == "en" and router.detect(prompt) == ("en", 0.0)


@pytest.mark.parametrize("prompt", ["🐱🐶🌸", "12345", "2024-01-01", "😀 ❤️ 👍", "\ud800"])
def test_letterless_prompts_go_to_the_fallback(router, prompt):
    (span,) = router.plan(prompt).spans
    assert (span.language, span.confidence, span.how, span.target) == ("en", 0.0, "fallback:no-letters", "backbone")
    assert router.plan(prompt).backbone_text == prompt


@pytest.mark.parametrize("prompt", ["שלום עולם", "Καλημέρα κόσμε", "สวัสดี", "ሰላም", "ᚠᚢᚦ"])
def test_scripts_no_language_uses_go_to_the_fallback(router, prompt):
    (span,) = router.plan(prompt).spans
    assert (span.language, span.confidence, span.how, span.target) == ("en", 0.0, "fallback:unknown-script", "backbone")
    assert span.text == prompt


def test_right_to_left_and_control_characters(router):
    plan = router.plan("\u202bقطة نائمة\u202c on a sofa")
    assert [s.language for s in plan.spans] == ["ar", "en"]
    assert plan.branch_texts["ar"].strip("\u202b\u202c") == "قطة نائمة"
    plan = router.plan("a\x00 red\x07 car\x1b")
    assert [s.language for s in plan.spans] == ["en"] and "\x00" not in plan.backbone_text
    assert all(0x20 <= ord(c) for c in plan.spans[0].text)
    assert spans(router, "ab\ud800cd 山水画")[1] == ("zh", "山水画")


def test_long_prompts_are_routed_in_linear_time(router):
    for prompt in ("a cat on a sofa, " * 600, "x" * 10_000, "猫" * 10_000, "a" + "🐱" * 10_000):
        started = time.perf_counter()
        plan = router.plan(prompt)
        assert time.perf_counter() - started < 5.0
        assert plan.spans and all(s.language in REGISTERED for s in plan.spans)
    assert spans(router, "a cat on a sofa, " * 600)[0][0] == "en"


def test_plans_are_cached_and_immutable(router):
    assert router.plan("a red car") is router.plan("a red car")
    plan = router.plan("a cyberpunk city with 灯笼 in the street")
    with pytest.raises(TypeError):
        plan.branch_texts["zh"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError, match="prompt must be a string"):
        router.plan(None)  # type: ignore[arg-type]


def test_router_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown script 'Klingon'"):
        Router({"en": ["Latin"], "tlh": ["Klingon"]})
    with pytest.raises(ValueError, match="fallback_language 'fr' is not one of the router's languages"):
        Router({"en": ["Latin"]}, fallback_language="fr")
    with pytest.raises(ValueError, match="threshold must be in"):
        Router({"en": ["Latin"]}, threshold=2)
    with pytest.raises(ValueError, match="routes"):
        Router({"en": ["Latin"]}, routes={"en": "nowhere"})
    assert set(HOW) >= {s.how for s in Router({"en": ["Latin"]}).plan("a 🐱, Ωμέγα").spans}
    assert all(s in SCRIPT_RANGES for s in ("Latin", "Han", "Hiragana", "Katakana", "Hangul"))


def test_languages_the_detector_does_not_know_are_a_guess():
    # Two Latin languages lingua cannot tell apart (it knows neither): confidence 0, so the fallback applies.
    router = Router({"en": ["Cyrillic"], "xx": ["Latin"], "yy": ["Latin"]})
    (span,) = router.plan("hello world").spans
    assert (span.language, span.how, span.detected) == ("en", "fallback:unsure", "xx")
    # Only one language writes Latin: no detector at all.
    only = Router({"en": ["Latin"], "zh": ["Han"]})
    assert only.scorer is None and only.plan("bonjour").spans[0].how == "script"


# --------------------------------------------------------------------------- fast paths: same plans, fewer lingua calls


def dicts(plans) -> list[dict]:
    return [p.to_dict() for p in plans]  # confidences rounded to 4 places (lingua's last bits vary call to call)


class CountingDetector:
    """Wraps a lingua detector, counting single-word and batched calls."""

    def __init__(self, detector):
        self.detector, self.single, self.batches = detector, 0, []

    def compute_language_confidence_values(self, text):
        self.single += 1
        return self.detector.compute_language_confidence_values(text)

    def compute_language_confidence_values_in_parallel(self, texts):
        self.batches.append(len(texts))
        return self.detector.compute_language_confidence_values_in_parallel(texts)


def unseeded(registry, **kwargs) -> Router:
    router = Router.from_registry(registry, scorer=WordScorer(LATIN, seed=()), **kwargs)
    router.scorer.known  # noqa: B018 - loads lingua
    router.scorer._detector = CountingDetector(router.scorer._detector)
    return router


def test_plan_many_is_plan_with_the_new_words_in_one_lingua_call(registry):
    prompts = [p for _, p in read_route_set(PROMPTS)]
    one, batch = unseeded(registry), unseeded(registry)
    expected = dicts(one.plan(p) for p in prompts)
    assert dicts(batch.plan_many(prompts)) == expected
    words = one.scorer.lingua_calls
    assert words >= PARALLEL_MIN and one.scorer._detector.single == words and not one.scorer._detector.batches
    assert batch.scorer._detector.batches == [words] and batch.scorer._detector.single == 0
    # Known prompts and words: no lingua at all; duplicates and an empty list are fine.
    assert dicts(batch.plan_many(prompts[:5] * 2)) == expected[:5] * 2 and batch.plan_many([]) == []
    assert batch.scorer._detector.batches == [words] and batch.scorer._detector.single == 0
    # A few new words: one call a word (a thread pool would cost more than it saves).
    assert len(batch.plan_many(["ein kleines rotes Segelboot", "sunlit meadow"])) == 2
    assert batch.scorer._detector.batches == [words] and 0 < batch.scorer._detector.single < PARALLEL_MIN
    with pytest.raises(TypeError, match="prompt must be a string"):
        batch.plan_many(["a cat", None])  # type: ignore[list-item]


def test_seed_words_change_speed_not_plans(registry):
    seeded = Router.from_registry(registry)
    seed_words = seeded.scorer.seed_words  # the registry's: each Latin-script entry's detection.seed_words
    assert set(seed_words) == {w for code in LATIN for w in registry.language(code).seed_words}
    assert seeded.scorer.known and set(seed_words) <= set(seeded.scorer._cache)
    assert len(seed_words) > 4000 and all(w == w.lower() and w.isalpha() for w in seed_words)
    assert scorer_words(seed_words) == seed_words  # a list holds words as the scorer reads them
    prompts = [p for _, p in read_route_set(PROMPTS)]
    plain = unseeded(registry)
    assert dicts(seeded.plan_many(prompts)) == dicts(plain.plan(p) for p in prompts)
    assert seeded.scorer.lingua_calls < plain.scorer.lingua_calls / 2
    # The seed stays when the cache is cleared (it is, when full).
    small = WordScorer(LATIN, cache_size=2, seed=seed_words)
    small.known  # noqa: B018
    for w in ("zorblat", "quixotrix", "flumbergast"):
        small.word(w)
    assert set(seed_words) <= set(small._cache) and len(small._cache) <= len(seed_words) + 2
    assert small.word("the") == seeded.scorer.word("the")


@pytest.mark.parametrize("prompt", [
    "a b.c", "un chat noir.a red car on the street", "e.g. a cat", "x...y", "a, , b", "...a...", "8k, HDR",
    "a\tb\nc", "Mr.Smith in Paris. Une belle journee", "a.b.c.d", "ab, cd; ef | gh! ij? kl. mn", "CG, 4k",
    "ein Hund,a dog", "  la plage au coucher du soleil  .", "1girl, solo, masterpiece", "a" * 300])
def test_ascii_prompts_take_a_shortcut_to_the_same_plan(registry, prompt):
    fast = Router.from_registry(registry, cache_size=0)
    slow = Router.from_registry(registry, cache_size=0, scorer=fast.scorer)
    slow._ascii_setup = False  # the general path
    assert fast.plan(prompt).to_dict() == slow.plan(prompt).to_dict()
    assert fast._ascii_setup  # the shortcut is on (for the registry's Latin languages)


def test_ascii_shortcut_on_the_whole_set(registry):
    fast = Router.from_registry(registry, cache_size=0)
    slow = Router.from_registry(registry, cache_size=0, scorer=fast.scorer)
    slow._ascii_setup = False
    prompts = [p for _, p in read_route_set(PROMPTS) if p.isascii()]
    assert len(prompts) > 100 and dicts(fast.plan(p) for p in prompts) == dicts(slow.plan(p) for p in prompts)


def test_a_period_separates_only_before_a_space(router):
    # "noir.a" is one piece of text wherever it stands (a period ends a chunk only when a space follows)
    for prompt in ("un chat noir.a red car", "a red car, un chat noir.a", "赤い鳥居, a red car, un chat noir.a",
                   "полке, Kaffee neige.café"):
        got, underscore = router.plan(prompt).spans, router.plan(prompt.replace(".", "_")).spans
        assert [s[1:5] for s in got] == [s[1:5] for s in underscore], prompt


def test_plan_cache_keeps_the_recently_used(registry):
    router = Router.from_registry(registry, cache_size=2)
    a, b = router.plan("a red car"), router.plan("a blue car")
    assert router.plan("a red car") is a
    router.plan("a green car")  # drops the least recently used: "a blue car"
    assert router.plan("a red car") is a and router.plan("a blue car") is not b
    assert len(router._plans) == 2
    assert Router.from_registry(registry, cache_size=0).plan("a red car") is not a
