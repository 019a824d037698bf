"""`polybridge route` and `polybridge generate` without --lang (the router decides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import test_generate_cli
from polybridge.cli import main
from tiny_components import get_dummy_components, write_registry

REPO = Path(__file__).resolve().parent.parent
tiny_registry = test_generate_cli.tiny_registry  # the same fixture: zh trained, ja (Hiragana) untrained


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- route


def test_route_prints_the_plan(capsys):
    code, out, err = run(capsys, "--registry", str(REPO), "route", "a cyberpunk city with 灯笼 in the street")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "a cyberpunk city with 灯笼 in the street"
    assert "span" in lines[1] and "confidence" in lines[1] and "goes to" in lines[1]
    assert lines[3].split()[:6] == ["a", "cyberpunk", "city", "with", "en", lines[3].split()[5]]
    assert "backbone text encoder" in lines[3] and "zh branch" in lines[4] and "script+fewest" in lines[4]
    assert "backbone reads: 'a cyberpunk city with in the street'" in out and "zh branch reads: '灯笼'" in out


def test_route_json_and_file(capsys, tmp_path):
    code, out, _ = run(capsys, "--registry", str(REPO), "route", "桜の木, anime style", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["label"] == "ja+en"
    assert [(s["language"], s["text"], s["target"]) for s in plan["spans"]] == [
        ("ja", "桜の木", "branch"), ("en", "anime style", "backbone")]
    assert plan["branch_texts"] == {"ja": "桜の木"} and plan["backbone_text"] == "anime style"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("masterpiece, best quality, 山水画\nкот\n12345\n", encoding="utf-8")
    code, out, _ = run(capsys, "--registry", str(REPO), "route", "--file", str(prompts), "--json")
    plans = json.loads(out)
    assert code == 0 and [p["label"] for p in plans] == ["en+zh", "ru", "en"]
    assert plans[2]["spans"][0]["how"] == "fallback:no-letters"
    code, out, _ = run(capsys, "--registry", str(REPO), "route", "--file", str(prompts))
    assert code == 0 and out.count("goes to") == 3


@pytest.mark.parametrize("prompt", ["", "   ", "🐱🐶", "שלום", "a\x07b"])
def test_route_bad_input_never_crashes(capsys, prompt):
    code, out, err = run(capsys, "--registry", str(REPO), "route", prompt)
    assert code == 0, err
    assert out.strip()


def test_route_usage_errors(capsys, tmp_path):
    code, _, err = run(capsys, "--registry", str(REPO), "route")
    assert code == 2 and "give either a PROMPT or --file" in err
    code, _, err = run(capsys, "--registry", str(REPO), "route", "--file", str(tmp_path / "missing.txt"))
    assert code == 2 and "no such file" in err


# --------------------------------------------------------------------------- generate without --lang


def test_generate_routes_each_prompt(capsys, tiny_registry, tmp_path):
    out = tmp_path / "grid.png"
    code, stdout, err = run(capsys, "--registry", str(tiny_registry), "generate", "a red circle, 红色的圆", "-n", "2",
                            "--steps", "2", "-o", str(out), "--json", "--upscale", "1")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["language"] == "auto" and record["trained_branch"] is True
    assert [(s["language"], s["text"]) for s in record["routes"][0]["spans"]] == [("en", "a red circle"), ("zh", "红色的圆")]
    with Image.open(out) as im:
        assert im.size == (2 * record["size"], record["size"])
    # The same image as naming the language and the English part by hand.
    explicit = tmp_path / "explicit.png"
    run(capsys, "--registry", str(tiny_registry), "generate", "红色的圆", "--lang", "zh", "--english-prompt",
        "a red circle", "-n", "2", "--steps", "2", "-o", str(explicit), "--upscale", "1")
    assert out.read_bytes() == explicit.read_bytes()


def test_generate_routed_file_mixes_languages(capsys, tiny_registry, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("红色的圆\na blue square\nあかいまる\n", encoding="utf-8")
    code, stdout, err = run(capsys, "--registry", str(tiny_registry), "generate", "--file", str(prompts),
                            "--out", str(tmp_path / "set"), "--steps", "1")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert "routed '红色的圆': zh '红色的圆'" in err
    assert "ja has no trained branch yet" in err and "zero-branch" in err


def test_generate_routed_to_a_language_whose_fallback_is_error(capsys, tmp_path):
    registry = write_registry(tmp_path / "reg", get_dummy_components(),
                              {"ru": {"entry": {"scripts": ["Cyrillic"], "fallback": "error"}}})
    code, _, err = run(capsys, "--registry", str(registry), "generate", "красный круг", "-o",
                       str(tmp_path / "a.png"), "--steps", "1")
    assert code == 2
    assert "'красный круг' in 'красный круг' is ru (script)" in err and "fallback is 'error'" in err
    assert "polybridge train --lang ru" in err and not (tmp_path / "a.png").exists()
