import pytest

from polybridge.unicode_scripts import script_of


@pytest.mark.parametrize("char, script", [("人", "Han"), ("々", "Han"), ("〇", "Han"), ("の", "Hiragana"),
                                          ("カ", "Katakana"), ("한", "Hangul"), ("ж", "Cyrillic"), ("ع", "Arabic"),
                                          ("क", "Devanagari"), ("é", "Latin"), ("Ａ", "Latin")])
def test_script_of(char, script):
    assert script_of(char) == script


def test_iteration_mark_keeps_a_japanese_prompt_japanese():
    from polybridge.registry import load_registry
    from polybridge.router import Router

    plan = Router.from_registry(load_registry()).plan("浴衣姿の人々が花火を見る")
    assert [s.language for s in plan.spans] == ["ja"]
