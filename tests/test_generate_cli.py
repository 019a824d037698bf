"""`polybridge generate` on a tiny on-disk registry: grids, prompt files, untrained notice, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from polybridge.branches import BDMBranch
from polybridge.cli import main
from tiny_components import get_dummy_components, native_encoder, perturb_, write_registry


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reg")
    comps = get_dummy_components()
    enc = native_encoder(code="zh")
    branch = perturb_(BDMBranch.from_unet(comps["unet"], enc.hidden_size, encoder_name="./encoder"))
    return write_registry(root, comps, {
        "zh": {"encoder": enc, "branch": branch},
        "ja": {"encoder": native_encoder(code="ja"), "branch": None, "entry": {"scripts": ["Hiragana"]}},
    })


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_grid_and_json(capsys, tiny_registry, tmp_path):
    out = tmp_path / "grid.png"
    code, stdout, err = run(capsys, "--registry", str(tiny_registry), "generate", "红色的圆", "--lang", "zh", "-n", "3",
                            "--seed", "0", "--steps", "2", "-o", str(out), "--json", "--upscale", "1")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["n"] == 3 and record["language"] == "zh" and record["trained_branch"] is True
    with Image.open(out) as im:
        side = record["size"]
        assert im.size == (3 * side, side)
    # Same seed, same grid.
    out2 = tmp_path / "grid2.png"
    run(capsys, "--registry", str(tiny_registry), "generate", "红色的圆", "--lang", "zh", "-n", "3", "--seed", "0",
        "--steps", "2", "-o", str(out2), "--upscale", "1")
    assert out.read_bytes() == out2.read_bytes()


def test_generate_untrained_language_says_so(capsys, tiny_registry, tmp_path):
    code, _, err = run(capsys, "--registry", str(tiny_registry), "generate", "赤い円", "--lang", "ja", "-n", "1",
                       "--steps", "1", "-o", str(tmp_path / "ja.png"))
    assert code == 0
    assert "ja has no trained branch yet" in err and "zero-branch" in err
    assert (tmp_path / "ja.png").is_file()


def test_generate_from_file_writes_one_image_per_line(capsys, tiny_registry, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("红色的圆\n蓝色的方块\n黄色的星星\n", encoding="utf-8")
    out = tmp_path / "set"
    code, stdout, err = run(capsys, "--registry", str(tiny_registry), "generate", "--file", str(prompts), "--lang",
                            "zh", "--out", str(out), "--steps", "2", "--batch-size", "2", "--json")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert json.loads(stdout)["prompts"] == ["红色的圆", "蓝色的方块", "黄色的星星"]


@pytest.mark.parametrize("argv, words", [
    (["红色的圆", "--lang", "xx", "-o", "{tmp}/a.png"], "unknown language code 'xx'"),
    (["   ", "--lang", "zh", "-o", "{tmp}/a.png"], "the prompt is empty"),
    (["红色的圆", "--lang", "zh"], "give -o OUT.png"),
    (["红色的圆", "--lang", "zh", "-o", "{tmp}/a.png", "--guidance", "-1"], "--guidance must be 0 or more"),
    (["--file", "{tmp}/missing.txt", "--lang", "zh", "--out", "{tmp}/o"], "no such file"),
    (["红色的圆", "--lang", "zh", "-o", "{tmp}/blocker/a.png"], "is a file, not a folder"),
])
def test_generate_bad_input(capsys, tiny_registry, tmp_path, argv, words):
    (tmp_path / "blocker").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run(capsys, "--registry", str(tiny_registry), "generate", *argv, "--steps", "1")
    assert code == 2 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_generate_zero_steps_is_refused(capsys, tiny_registry, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--registry", str(tiny_registry), "generate", "红色的圆", "--lang", "zh", "-o", str(tmp_path / "a.png"),
              "--steps", "0"])
    assert info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
