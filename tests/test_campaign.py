"""The fault and bad-input campaign (issue 19), kept as tests so what it found stays fixed.

One family per kind of attack: malformed registries and grammars (``registry``), resource bombs (``bombs``), bad
numbers and limits (``numbers``), corrupt weights (``weights``), hostile prompts and files (``text``), output
locations (``outputs``), kill -9 leftovers (``leftovers``), user mistakes that must be one line (``mistakes``) and
what ``registry validate`` promises (``validate``). Every case ends in a clear one-line error naming the file,
key or argument, or in documented behaviour, with nothing outside the named output touched. Fast: no case
trains for more than a few tiny steps. ``pytest tests/test_campaign.py -q -rA | grep -c family`` counts them;
:data:`FAMILIES` is what the last test checks.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polybridge.cli import main
from polybridge.errors import PolyBridgeError
from polybridge.registry import RegistryError, load_registry, read_yaml
from conftest import copy_registry
from test_registry import _base, _write_registry

REPO = Path(__file__).resolve().parent.parent

#: Cases per family; each parametrised test adds its cases here at import (checked by the last test).
FAMILIES: dict[str, int] = {}


def family(name: str, cases: list) -> list:
    """``cases`` of a parametrised test, counted in family ``name``."""
    FAMILIES[name] = FAMILIES.get(name, 0) + len(cases)
    return cases


def counts(name: str, n: int):
    """A test that checks ``n`` cases of family ``name`` in one go."""
    FAMILIES[name] = FAMILIES.get(name, 0) + n
    return lambda test: test


def one_line(exc: BaseException, limit: int = 600) -> str:
    """The message of a user's mistake: one line, short, no traceback."""
    text = str(exc)
    assert "\n" not in text and len(text) < limit, text[:2000]
    return text


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refuses a bad value itself: usage and one error line, exit 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- registry: malformed entries


def _bomb(depth: int = 9, width: int = 9) -> str:
    """A "billion laughs": ``width ** depth`` strings from about 1 kB of YAML."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


REGISTRY_CASES = family("registry", [
    # (dotted key in the zh entry or "top.<key>", value, words in the message)
    ("branch.training.learning_rate", float("inf"), "branch.training.learning_rate: expected a finite number"),
    ("branch.training.learning_rate", float("nan"), "branch.training.learning_rate: expected a finite number"),
    ("branch.training.learning_rate", "-.inf", "branch.training.learning_rate"),
    ("branch.training.learning_rate", 1e308, "branch.training.learning_rate: must be from 0 to 1"),
    ("branch.training.max_grad_norm", float("inf"), "branch.training.max_grad_norm: expected a finite number"),
    ("branch.training.ema_decay", float("nan"), "branch.training.ema_decay: expected a finite number"),
    ("branch.training.batch_size", 10**9, "branch.training.batch_size: must be from 1 to 4096"),
    ("branch.training.max_steps", 10**12, "branch.training.max_steps: must be from 1 to"),
    ("branch.training.gradient_accumulation_steps", 10**9, "branch.training.gradient_accumulation_steps"),
    ("branch.scale", float("nan"), "branch.scale: expected a finite number"),
    ("branch.scale", float("inf"), "branch.scale: expected a finite number"),
    ("branch.scale", 1e308, "branch.scale: must be from 0 to 10"),
    ("branch.scale", -1.0, "branch.scale: must be from 0 to 10"),
    ("data.num_samples", 10**9, "data.num_samples: must be from 1 to"),
    ("encoder.tokenizer_class", "CLIPTextModel", "encoder.tokenizer_class: 'CLIPTextModel' is not a tokenizer class"),
    ("encoder.tokenizer_class", "os.system", "encoder.tokenizer_class"),
    ("name", ["x" * 10_000] * 50, "name: expected a string, got list"),
    ("top.detection_threshold", float("nan"), "detection_threshold: expected a finite number"),
])


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


@pytest.mark.parametrize("key, value, words", REGISTRY_CASES)
def test_registry_family_bad_values_name_file_and_key(tmp_path, key, value, words):
    top, langs = _base()
    if key.startswith("top."):
        top[key[4:]] = value
    else:
        _set(langs["zh"], key, value)
    path = _write_registry(tmp_path, top, langs)
    if value == "-.inf":  # written as YAML's own spelling
        text = (tmp_path / "languages/zh/language.yaml").read_text()
        (tmp_path / "languages/zh/language.yaml").write_text(text.replace("'-.inf'", "-.inf"))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = one_line(info.value)
    assert words in message and ("registry.yaml" in message or "language.yaml" in message)


LIST_KEY_CASES = family("registry", [
    "[a, b]: 1\n",
    "? [a, b]\n: 1\nversion: 1\n",
    "version: 1\nbackbones:\n  {x: 1}: 2\n",
    "version: 1\n<<: {[a]: 1}\n",
    "version: 1\nversion: 1\n",
    "a: &x [*x]\n",
    "\ufeff\x00",
    "version: 1\n" + "# " + "x" * 5000 + "\nbad: [\n",
])


@pytest.mark.parametrize("text", LIST_KEY_CASES)
def test_registry_family_unreadable_yaml_is_one_line(tmp_path, text):
    (tmp_path / "registry.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError, match="registry.yaml") as info:
        load_registry(tmp_path)
    one_line(info.value)


@counts("registry", 1)
def test_registry_family_a_concept_owned_twice_names_both_files(tmp_path):
    top, langs = _base()
    langs["ja"] = copy.deepcopy(langs["zh"]) | {"code": "ja", "scripts": ["Hiragana"]}
    top["languages"] = ["en", "zh", "ja"]
    with pytest.raises(RegistryError) as info:
        load_registry(_write_registry(tmp_path, top, langs))
    message = one_line(info.value)
    assert str(tmp_path / "languages/ja/language.yaml") in message
    assert str(tmp_path / "languages/zh/language.yaml") in message


# --------------------------------------------------------------------------- bombs: size, aliases, devices


def _bomb_registry(tmp_path: Path) -> Path:
    top, langs = _base()
    path = _write_registry(tmp_path, top, langs)
    path.write_text(_bomb() + path.read_text(), encoding="utf-8")
    return path


def _bomb_in_options(tmp_path: Path) -> Path:
    top, langs = _base()
    path = _write_registry(tmp_path, top, langs)
    entry = tmp_path / "languages/zh/language.yaml"
    text = entry.read_text()
    entry.write_text(text.replace("branch:\n", "branch:\n  options:\n    bomb:\n"
                                  + "".join("      " + line + "\n" for line in _bomb().splitlines()), 1))
    return path


def _grammar_dev_zero(tmp_path: Path) -> Path:
    top, langs = _base()
    langs["zh"]["synthetic"]["grammar"] = "/dev/zero"
    return _write_registry(tmp_path, top, langs)


def _huge_entry(tmp_path: Path) -> Path:
    top, langs = _base()
    path = _write_registry(tmp_path, top, langs)
    with open(tmp_path / "languages/zh/language.yaml", "a", encoding="utf-8") as fh:
        fh.write("# " + "x" * (2 << 20) + "\n")
    return path


def _symlinked_entry(tmp_path: Path) -> Path:
    top, langs = _base()
    path = _write_registry(tmp_path, top, langs)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:" + "s3cret-" * 400 + "\n")  # a system file's lines: one long YAML string
    entry = tmp_path / "languages/zh/language.yaml"
    entry.unlink()
    entry.symlink_to(secret)
    return path


def _registry_is_a_device(tmp_path: Path) -> Path:
    (tmp_path / "registry.yaml").symlink_to("/dev/zero")
    return tmp_path / "registry.yaml"


BOMB_CASES = family("bombs", [
    (_bomb_registry, "expand to over 100,000 values"),
    (_bomb_in_options, "expand to over 100,000 values"),
    (_grammar_dev_zero, "synthetic.grammar: /dev/zero is not a regular file"),
    (_huge_entry, "a YAML data file may have at most 1,048,576"),
    (_symlinked_entry, "expected a mapping"),
    (_registry_is_a_device, "not a regular file"),
])


@pytest.mark.parametrize("make, words", BOMB_CASES, ids=[c[0].__name__ for c in BOMB_CASES])
def test_bombs_family_are_refused_quickly_with_a_short_message(tmp_path, make, words):
    path = make(tmp_path)
    started = time.perf_counter()
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert time.perf_counter() - started < 5
    message = one_line(info.value, limit=400)
    assert words in message
    assert "s3cret-s3cret-s3cret-s3cret-s3cret-s3cret-s3cret-s3cret-s3cret-s3cret-s3cret-s3cret" not in message


@counts("bombs", 2)
def test_bombs_family_a_grammar_bomb_and_a_prompt_file_device(tmp_path, capsys):
    from polybridge.synthetic.grammar import GrammarError, load_grammar

    (tmp_path / "grammar.yaml").write_text(_bomb(), encoding="utf-8")
    with pytest.raises(GrammarError, match="expand to over"):
        load_grammar(tmp_path / "grammar.yaml", "zh", [])
    code, _, err = run_cli(capsys, "--registry", str(REPO), "route", "--file", "/dev/zero")
    assert code == 2 and "--file /dev/zero: not a regular file" in error_line(err)


@counts("bombs", 2)
def test_bombs_family_a_huge_wrong_value_is_quoted_as_an_excerpt(tmp_path):
    from polybridge.synthetic.grammar import GrammarError, load_grammar

    grammar = (REPO / "languages/zh/grammar.yaml").read_text(encoding="utf-8")
    (tmp_path / "grammar.yaml").write_text(grammar.replace("    small: 小", "    small: [" + "1, " * 20_000 + "1]"))
    with pytest.raises(GrammarError, match="words.size.small") as info:
        load_grammar(tmp_path / "grammar.yaml", "zh", ["lantern", "pagoda"])
    one_line(info.value)
    top, langs = _base()
    langs["zh"]["code"] = "zh\n" + "z" * 50_000
    (tmp_path / "reg").mkdir()
    with pytest.raises(RegistryError) as info:
        load_registry(_write_registry(tmp_path / "reg", top, langs))
    one_line(info.value)


@counts("bombs", 1)
def test_bombs_family_alias_reuse_within_the_bound_still_loads(tmp_path):
    (tmp_path / "ok.yaml").write_text("base: &b {x: 1, y: [1, 2]}\none: *b\ntwo: {<<: *b, x: 3}\n")
    assert read_yaml(tmp_path / "ok.yaml") == {"base": {"x": 1, "y": [1, 2]}, "one": {"x": 1, "y": [1, 2]},
                                               "two": {"x": 3, "y": [1, 2]}}


# --------------------------------------------------------------------------- numbers: limits before any work


NUMBER_CLI_CASES = family("numbers", [
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--steps", "100000"], "--steps: must be at most 1,000"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--steps", str(10**12)], "--steps: must be at most"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--guidance", "1e308"], "--guidance must be 0 or more and"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--guidance", "nan"], "--guidance must be 0 or more and"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--guidance=-inf"], "--guidance must be 0 or more"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--branch-scale", "nan"], "--branch-scale: must be"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--branch-scale", "inf"], "--branch-scale: must be"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--branch-scale", "1e308"], "--branch-scale: must be"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--upscale", "100000"], "--upscale: must be at most 16"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--size", "100000"], "--size: must be at most 4,096"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "--batch-size", str(10**9)], "--batch-size: must be"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "-n", str(10**9)], "argument -n: must be at most"),
    (["generate", "x", "--lang", "zh", "-o", "{tmp}/a.png", "-n", "10000", "--upscale", "16"], "grid; at most"),
    (["train", "--lang", "zh", "--lr", "inf"], "--lr: must be a finite number from 0 to 1"),
    (["train", "--lang", "zh", "--lr", "nan"], "--lr: must be a finite number"),
    (["train", "--lang", "zh", "--batch-size", str(10**9)], "--batch-size: must be at most 4,096"),
    (["train", "--lang", "zh", "--num-samples", str(10**9)], "--num-samples: must be at most"),
    (["train", "--lang", "zh", "--steps", str(10**12)], "--steps: must be at most"),
    (["train", "--lang", "zh", "--caption-dropout", "nan"], "--caption-dropout: must be a finite"),
    (["synth", "render", "--lang", "zh", "-n", "1", "--size", "100000", "--out", "{tmp}/r"], "--size: must be at most"),
    (["synth", "render", "--lang", "zh", "-n", str(10**9), "--out", "{tmp}/r"], "argument -n: must be at most"),
    (["bench", "--steps", "100000"], "--steps: must be at most"),
])


@pytest.mark.parametrize("argv, words", NUMBER_CLI_CASES)
def test_numbers_family_cli_bounds_are_checked_before_any_work(capsys, tmp_path, argv, words):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "--registry", str(REPO), *argv)
    assert code == 2 and words in error_line(err)
    assert time.perf_counter() - started < 5 and list(tmp_path.iterdir()) == []


NUMBER_OPTION_CASES = family("numbers", [
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
    ({"learning_rate": 1e308}, "learning_rate must be at most"),
    ({"batch_size": 10**9}, "batch_size must be at most 4,096"),
    ({"max_steps": 10**12}, "max_steps must be at most"),
    ({"num_samples": 10**9}, "num_samples must be from 1 to"),
    ({"caption_dropout": float("nan")}, "caption_dropout must be a finite number"),
])


@pytest.mark.parametrize("kwargs, words", NUMBER_OPTION_CASES)
def test_numbers_family_training_options_are_checked_with_the_entry(registry_copy, tmp_path, kwargs, words):
    from polybridge.training.trainer import TrainingError, TrainOptions, train_language

    options = TrainOptions(out_dir=tmp_path / "out", work_dir=tmp_path / "work", progress=False, **kwargs)
    with pytest.raises(TrainingError) as info:
        train_language(load_registry(registry_copy), "zh", options, log=lambda _m: None)
    assert words in one_line(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@counts("numbers", 4)
def test_numbers_family_limits_helpers():
    from polybridge import limits

    for bad in (float("nan"), float("inf"), 1e308, True):
        with pytest.raises(PolyBridgeError, match="guidance_scale must be a finite number from 0 to 100"):
            limits.check_float(bad, "guidance_scale", 0, limits.MAX_GUIDANCE)
    assert limits.check_int(25, "steps", 1, limits.MAX_INFERENCE_STEPS) == 25


# --------------------------------------------------------------------------- the pipeline: bounds and NaN latents


@pytest.fixture(scope="module")
def tiny_pipe():
    from polybridge.branches import BDMBranch
    from polybridge.pipeline import PolyBridgePipeline
    from tiny_components import get_dummy_components, native_encoder, perturb_

    components = get_dummy_components()
    pipe = PolyBridgePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.add_language("zh", native_encoder(48, seed=1, code="zh"),
                      perturb_(BDMBranch.from_unet(components["unet"], 48, encoder_name="./encoder"), seed=3))
    return pipe


PIPELINE_CASES = family("numbers", [
    ({"num_inference_steps": 100_000}, "num_inference_steps must be a whole number from 1 to 1,000"),
    ({"guidance_scale": 1e308}, "guidance_scale must be a finite number from 0 to 100"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"branch_scale": float("nan")}, "branch_scale"),
    ({"branch_scale": float("inf")}, "branch_scale"),
    ({"branch_scale": 1e308}, "branch_scale must be a finite number from 0 to 10"),
    ({"height": 100_000, "width": 64}, "height must be a whole number from 1 to 4,096"),
    ({"num_images_per_prompt": 100_000}, "images (prompts x num_images_per_prompt) must be"),
])


@pytest.mark.parametrize("kwargs, words", PIPELINE_CASES)
def test_numbers_family_pipeline_arguments(tiny_pipe, kwargs, words):
    with pytest.raises(PolyBridgeError) as info:
        tiny_pipe("红色的圆", language="zh", num_inference_steps=kwargs.pop("num_inference_steps", 1), **kwargs)
    assert words in one_line(info.value)


@counts("numbers", 1)
def test_numbers_family_non_finite_latents_stop_with_a_clear_error(tiny_pipe):
    import torch

    weight = tiny_pipe.unet.conv_out.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("inf"))
        with pytest.raises(PolyBridgeError, match="non-finite latents"):
            tiny_pipe("红色的圆", language="zh", num_inference_steps=1, output_type="np")
    finally:
        with torch.no_grad():
            weight.copy_(saved)


# --------------------------------------------------------------------------- weights: corrupt files


@pytest.fixture(scope="module")
def saved_branch(tmp_path_factory):
    from polybridge.branches import BDMBranch
    from tiny_components import get_dummy_components

    folder = tmp_path_factory.mktemp("branch") / "branch"
    BDMBranch.from_unet(get_dummy_components()["unet"], 48, encoder_name="./encoder").save_pretrained(folder)
    return folder


def _zero_bytes(file: Path) -> None:
    file.write_bytes(b"")


def _truncated(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _random_bytes_under_a_valid_header(file: Path) -> None:
    data = file.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    file.write_bytes(data[:header] + b"\xff" * (len(data) - header))  # 0xffffffff is a NaN float32


def _header_only(file: Path) -> None:
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")


def _not_safetensors(file: Path) -> None:
    file.write_bytes(b"PK\x03\x04" + os.urandom(64))


CORRUPTIONS = [_zero_bytes, _truncated, _random_bytes_under_a_valid_header, _header_only, _not_safetensors]
WEIGHT_CASES = family("weights", [(what, c) for what in ("branch", "scorer", "encoder") for c in CORRUPTIONS])


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


@pytest.mark.parametrize("what, corrupt", WEIGHT_CASES,
                         ids=[f"{w}-{c.__name__.strip('_')}" for w, c in WEIGHT_CASES])
def test_weights_family_corrupt_files_are_one_line_errors(saved_branch, tmp_path, what, corrupt):
    if what == "branch":
        from polybridge.branches import Branch

        folder = _copy(saved_branch, tmp_path / "branch")
        corrupt(folder / "diffusion_pytorch_model.safetensors")
        with pytest.raises(PolyBridgeError) as info:
            Branch.from_pretrained(folder)
    elif what == "scorer":
        from polybridge.synthetic.scorer import SceneScorer

        folder = _copy(REPO / "polybridge/assets/scorer", tmp_path / "scorer")
        corrupt(folder / "model.safetensors")
        with pytest.raises(PolyBridgeError) as info:
            SceneScorer.from_pretrained(folder)
    else:
        from polybridge.encoders import load_encoder

        root = copy_registry(tmp_path / "repo", with_artifacts=True).parent
        corrupt(root / "languages/zh/encoder/model.safetensors")
        with pytest.raises(PolyBridgeError) as info:
            load_encoder(load_registry(root).language("zh"))
        assert "encoder.source" in str(info.value)
    message = one_line(info.value, limit=1200)
    assert "safetensors" in message or "NaN" in message or "weights" in message


CONFIG_CASES = family("weights", [
    ("cross_attention_dim", "big"),
    ("layers_per_block", "two"),
    ("block_out_channels", 7),
    ("norm_num_groups", "x"),
    ("down_block_types", 3),
])


@pytest.mark.parametrize("key, value", CONFIG_CASES)
def test_weights_family_a_wrong_typed_branch_config_value(saved_branch, tmp_path, key, value):
    from polybridge.branches import Branch

    folder = _copy(saved_branch, tmp_path / "branch")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PolyBridgeError) as info:
        Branch.from_pretrained(folder)
    assert "config.json" in one_line(info.value, limit=1200)


@counts("weights", 1)
def test_weights_family_an_empty_tokenizer_folder_says_to_build_it(tmp_path):
    from polybridge.encoders import load_encoder

    import shutil

    root = copy_registry(tmp_path / "repo", with_artifacts=True).parent
    shutil.rmtree(root / "languages/zh/tokenizer")
    (root / "languages/zh/tokenizer").mkdir()
    with pytest.raises(PolyBridgeError) as info:
        load_encoder(load_registry(root).language("zh"))
    message = one_line(info.value)
    assert "is empty" in message and "tokenizer build" in message and "sentencepiece" not in message


# --------------------------------------------------------------------------- text: hostile prompts and files


INVISIBLE = family("text", ["\ufeff", "\u200b", "\u200e", "\u202e", "\u2066", "\u2060", "\u2028", "\u2029",
                            "\x1b", "\x00", "\x85"])


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_text_family_invisible_characters_never_pick_a_language(char):
    from polybridge.router import Router

    router = Router.from_registry(load_registry(REPO))
    assert router.plan(char).spans == ()
    plan = router.plan(f"{char}红色的灯笼{char}")
    assert [s.language for s in plan.spans] == ["zh"] and char not in plan.spans[0].text
    english = router.plan(f"{char}a red cube")
    assert {s.language for s in english.spans} == {"en"}


@counts("text", 2)
def test_text_family_plan_many_refuses_a_bare_string():
    from polybridge.errors import PolyBridgeTypeError
    from polybridge.router import Router

    router = Router.from_registry(load_registry(REPO))
    with pytest.raises(PolyBridgeTypeError, match="list of strings, got one str"):
        router.plan_many("a red cube")
    with pytest.raises(PolyBridgeTypeError):
        router.plan_many(b"a red cube")


FILE_CASES = family("text", [
    ("\ufeffa red cube\nred circle\n", ["a red cube", "red circle"]),
    ("a red\u2028cube\nred circle\n", ["a red\u2028cube", "red circle"]),
    ("a red\x0ccube\nred circle", ["a red\x0ccube", "red circle"]),
    ("a red\rcube\r\nred circle\r\n", ["a red\rcube", "red circle"]),
    ("a red\x1c\x1d\x1ecube\n", ["a red\x1c\x1d\x1ecube"]),
    ("one\u0085two\n", ["one\u0085two"]),
])


@pytest.mark.parametrize("text, prompts", FILE_CASES)
def test_text_family_prompt_files_split_on_newline_only(tmp_path, text, prompts):
    from polybridge.cli.common import read_prompt_file

    (tmp_path / "p.txt").write_text(text, encoding="utf-8", newline="")
    assert read_prompt_file(str(tmp_path / "p.txt")) == prompts


ESCAPES = family("text", ["\x1b[2J\x1b[H", "\x1b]0;pwned\x07", "\x9b31m", "\x1bc", "\u202eabc", "a\rb"])


@pytest.mark.parametrize("prompt", ESCAPES)
def test_text_family_route_never_prints_terminal_escapes(capsys, tmp_path, prompt):
    code, out, _ = run_cli(capsys, "--registry", str(REPO), "route", f"红色的灯笼 {prompt} red")
    assert code == 0
    assert not any(c in out for c in "\x1b\x07\x9b\u202e\r"), repr(out)
    (tmp_path / "p.txt").write_text(f"a red cube {prompt}\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "--registry", str(REPO), "route", "--file", str(tmp_path / "p.txt"))
    assert code == 0 and not any(c in out for c in "\x1b\x07\x9b\u202e\r"), repr(out)


INVALID_UTF8 = family("text", [
    ["route", "{bad}"],
    ["generate", "{bad}", "--lang", "zh", "-o", "{tmp}/a.png"],
    ["generate", "红色的圆", "--lang", "zh", "-o", "{tmp}/a.png", "--negative", "{bad}"],
])


@pytest.mark.parametrize("argv", INVALID_UTF8)
def test_text_family_invalid_utf8_arguments_are_one_line_errors(capsys, tmp_path, argv):
    bad = b"red \xff\xfe cube".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    argv = [a.replace("{bad}", bad).replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(capsys, "--registry", str(REPO), *argv)
    assert code == 2 and "not valid UTF-8 (byte 0xff" in error_line(err)


@counts("text", 1)
def test_text_family_a_broken_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from polybridge.cli import main; "
                             "sys.exit(main(['--registry', sys.argv[1], 'registry', 'show', 'zh']))", str(REPO)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


# --------------------------------------------------------------------------- outputs: only what the user named


def _registry_pointing_outside(registry_copy: Path, key: str, tmp_path: Path) -> tuple[Path, Path]:
    """The zh entry's ``key`` (encoder.tokenizer or branch.weights) pointed at a folder of the user's own files."""
    victim = tmp_path / "my-photos"
    victim.mkdir()
    (victim / "holiday.jpg").write_bytes(b"precious")
    entry = registry_copy.parent / "languages/zh/language.yaml"
    field, old = {"encoder.tokenizer": ("tokenizer", "./tokenizer"), "branch.weights": ("weights", "./branch")}[key]
    text = entry.read_text(encoding="utf-8")
    assert f"{field}: {old}" in text
    entry.write_text(text.replace(f"{field}: {old}", f"{field}: {victim}", 1), encoding="utf-8")
    return registry_copy, victim


OUTPUT_CASES = family("outputs", [
    ("encoder.tokenizer", ["tokenizer", "build", "--lang", "zh", "--n-captions", "50"]),
    ("branch.weights", ["train", "--lang", "zh", "--overwrite", "--steps", "1"]),
    ("branch.weights", ["train", "--lang", "zh", "--overwrite", "--resume", "--steps", "1"]),
])


@pytest.mark.parametrize("key, argv", OUTPUT_CASES)
def test_outputs_family_a_registry_never_replaces_a_folder_outside_its_language(capsys, registry_copy, tmp_path,
                                                                               key, argv):
    registry, victim = _registry_pointing_outside(registry_copy, key, tmp_path)
    code, _, err = run_cli(capsys, "--registry", str(registry), *argv)
    assert code == 2 and f"{key}: {victim} is outside" in error_line(err)
    assert sorted(p.name for p in victim.iterdir()) == ["holiday.jpg"]


@counts("outputs", 3)
def test_outputs_family_symlinks_are_replaced_as_links(tmp_path):
    from polybridge.atomic import atomic_dir, no_follow
    from polybridge.registry import resolve_source

    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(victim)
    assert no_follow(link) == link and resolve_source("./out", tmp_path) == link
    with atomic_dir(no_follow(link), overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").read_text() == "new"
    assert (victim / "keep.txt").read_text() == "mine"


@counts("outputs", 1)
def test_outputs_family_train_out_symlink_is_not_followed(registry_copy, tmp_path):
    from polybridge.training.trainer import TrainOptions, _plan_run

    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(victim)
    plan = _plan_run(load_registry(registry_copy), "zh",
                     TrainOptions(out_dir=tmp_path / "out", work_dir=tmp_path / "work", overwrite=True))
    assert plan.out == tmp_path / "out"


@counts("outputs", 2)
def test_outputs_family_o_file_is_not_replaced_without_overwrite(capsys, tmp_path):
    target = tmp_path / "mine.png"
    target.write_bytes(b"my picture")
    code, _, err = run_cli(capsys, "--registry", str(REPO), "generate", "红色的圆", "--lang", "zh", "-o", str(target))
    assert code == 2 and "exists; pass --overwrite" in error_line(err)
    assert target.read_bytes() == b"my picture"
    (tmp_path / "folder.png").mkdir()
    code, _, err = run_cli(capsys, "--registry", str(REPO), "generate", "红色的圆", "--lang", "zh", "-o",
                           str(tmp_path / "folder.png"), "--overwrite")
    assert code == 2 and "is a folder" in error_line(err)


@counts("outputs", 3)
def test_outputs_family_folders_polybridge_wrote_are_marked(tmp_path):
    from polybridge.atomic import MARKER, atomic_dir, check_replaceable, is_ours

    with atomic_dir(tmp_path / "branch", mark=True) as tmp:
        (tmp / "w").write_text("x")
    assert (tmp_path / "branch" / MARKER).is_file() and is_ours(tmp_path / "branch")
    check_replaceable(tmp_path / "branch", tmp_path / "languages/zh", "language.yaml: branch.weights")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", tmp_path / "languages/zh", "language.yaml: branch.weights")


# --------------------------------------------------------------------------- leftovers of kill -9


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


LEFTOVER_NAMES = family("leftovers", [".branch.tmp-p{pid}-abc", ".checkpoint.tmp-p{pid}-abc", ".cache.tmp-p{pid}-x",
                                      ".checkpoint.old-p{pid}-abc", ".gen.tmp-p{pid}-q", ".render.tmp-p{pid}-z"])


@pytest.mark.parametrize("name", LEFTOVER_NAMES)
def test_leftovers_family_the_next_write_removes_a_killed_writes_leftovers(tmp_path, capsys, name):
    from polybridge.atomic import atomic_dir

    target = tmp_path / name.split(".")[1]
    stale = tmp_path / name.format(pid=_dead_pid())
    stale.mkdir()
    (stale / "000001.png").write_bytes(b"half")
    live = tmp_path / name.format(pid=os.getppid())  # a writer that is still running
    live.mkdir()
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "done").write_text("ok")
    assert not stale.exists() and live.exists()
    assert f"removed {stale}, left by an interrupted write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


@counts("leftovers", 3)
def test_leftovers_family_files_old_names_and_a_folder_moved_aside(tmp_path, capsys):
    from polybridge.atomic import STALE_SECONDS, atomic_write_bytes, publish_dir

    stale_file = tmp_path / f".train_info.json.tmp-p{_dead_pid()}-k"
    stale_file.write_text("{")
    atomic_write_bytes(tmp_path / "train_info.json", b"{}")
    assert not stale_file.exists()
    old_style = tmp_path / ".scenes.jsonl.tmp-8xk2_q"  # an older polybridge's name: removed once it is old
    old_style.write_text("x")
    os.utime(old_style, (time.time() - STALE_SECONDS - 10,) * 2)
    fresh = tmp_path / ".scenes.jsonl.tmp-9zz1_q"
    fresh.write_text("x")
    atomic_write_bytes(tmp_path / "scenes.jsonl", b"")
    assert not old_style.exists() and fresh.exists()
    # killed between moving the previous checkpoint aside and renaming the new one into place
    aside = tmp_path / f".checkpoint.old-p{_dead_pid()}-w"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "state.json").write_text('{"step": 4}')
    from polybridge.atomic import remove_stale

    remove_stale(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text()) == {"step": 4} and not aside.exists()
    assert "put it back" in capsys.readouterr().err
    assert publish_dir  # the function a killed write was in


@pytest.mark.slow
def test_leftovers_family_kill_9_during_a_render_then_the_next_render_cleans_up(tmp_path):
    out = tmp_path / "render"
    proc = subprocess.Popen([sys.executable, "-m", "polybridge.cli", "--registry", str(REPO), "synth", "render",
                             "--lang", "en", "-n", "3000", "--out", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".render.tmp-*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".render.tmp-*"))
    done = subprocess.run([sys.executable, "-m", "polybridge.cli", "--registry", str(REPO), "synth", "render",
                           "--lang", "en", "-n", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0 and "left by an interrupted write" in done.stderr
    assert not list(tmp_path.glob(".render.tmp-*"))


# --------------------------------------------------------------------------- validate: it will run


@counts("validate", 1)
def test_validate_family_warns_about_trust_remote_code(capsys, registry_copy):
    entry = registry_copy.parent / "languages/zh/language.yaml"
    text = entry.read_text(encoding="utf-8")
    entry.write_text(text.replace("  max_length: 64", "  max_length: 64\n  trust_remote_code: true", 1))
    code, out, err = run_cli(capsys, "--registry", str(registry_copy), "registry", "validate", "--json")
    assert code == 0 and "WARNING" in err and "trust_remote_code" in err
    assert any("trust_remote_code" in w for w in json.loads(out)["warnings"])


VALIDATE_CASES = family("validate", [
    # (file in languages/zh, old, new, words): each passed `registry validate` and failed in `train`
    ("language.yaml", "caption_column: caption_zh", "caption_column: caption_ja", "data.caption_column"),
    ("language.yaml", "english_column: caption_en", "english_column: caption_xx", "data.english_column"),
    ("language.yaml", "english_column: caption_en", "english_column: caption_zh", "data.english_column"),
    ("language.yaml", "  image_column: image", "  image_column: image\n  split: training", "data.split"),
    ("language.yaml", "tokenizer_class: auto", "tokenizer_class: CLIPTextModel", "encoder.tokenizer_class"),
    ("language.yaml", "tokenizer_class: auto", "tokenizer_class: AutoModel", "encoder.tokenizer_class"),
    ("grammar.yaml", "{colour}{shape}位于", "{colr}{shape}位于", "unknown slot {colr}"),
    ("grammar.yaml", "    small: 小", "    small: []", "words.size.small"),
])


@pytest.mark.parametrize("file, old, new, words", VALIDATE_CASES)
def test_validate_family_what_train_needs_is_checked_by_validate(capsys, registry_copy, file, old, new, words):
    path = registry_copy.parent / "languages/zh" / file
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    code, _, err = run_cli(capsys, "--registry", str(registry_copy), "registry", "validate")
    line = error_line(err)
    assert code == 2 and f"languages/zh/{file}" in line and words in line


# --------------------------------------------------------------------------- mistakes: full disk, NaN weights


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory):
    from conftest import registry_with_tiny_backbone

    return registry_with_tiny_backbone(tmp_path_factory.mktemp("campaign") / "repo")


TINY = dict(num_samples=8, batch_size=2, max_steps=2, checkpoint_every=1, warmup_steps=0, progress=False)


@counts("mistakes", 1)
def test_mistakes_family_a_full_disk_names_the_path_and_keeps_the_checkpoint(tiny_registry, tmp_path, monkeypatch):
    from polybridge.training import trainer
    from polybridge.training.trainer import TrainingError, TrainOptions, train_language

    real = trainer._save_training_state

    def full_at_step_2(accelerator, ckpt, modules, step, *args):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(ckpt.parent / ".checkpoint.tmp-p1-x"))
        return real(accelerator, ckpt, modules, step, *args)

    monkeypatch.setattr(trainer, "_save_training_state", full_at_step_2)
    options = TrainOptions(**TINY, out_dir=tmp_path / "out", work_dir=tmp_path / "work")
    with pytest.raises(TrainingError) as info:
        train_language(load_registry(tiny_registry), "zh", options, log=lambda _m: None)
    message = one_line(info.value)
    assert "no space left" in message and str(tmp_path / "work" / "checkpoint") in message
    assert "(step 1) is intact" in message and "--resume" in message
    assert json.loads((tmp_path / "work/checkpoint/state.json").read_text())["step"] == 1


@counts("mistakes", 1)
def test_mistakes_family_non_finite_weights_are_never_written(tiny_registry, tmp_path):
    import torch

    from polybridge.training.trainer import TrainingError, TrainOptions, train_language


    def poison_ema(step, loss, run):
        if step == 1:
            with torch.no_grad():
                next(iter(run.ema.parameters())).fill_(float("nan"))

    options = TrainOptions(**TINY, ema=True, out_dir=tmp_path / "out", work_dir=tmp_path / "work")
    with pytest.raises(TrainingError, match=r"the ema weights .* are NaN or inf at step 2; nothing was written, "
                                            r"the last good checkpoint .*\(step 1\)"):
        train_language(load_registry(tiny_registry), "zh", options, log=lambda _m: None, callback=poison_ema)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "work/checkpoint/state.json").read_text())["step"] == 1


@counts("limits", 3)
def test_limits_family_a_long_file_keeps_what_it_drew_and_resumes(tiny_registry, tmp_path, capsys, monkeypatch):
    """--file: images are written batch by batch; an interrupted run keeps them, the same command resumes after
    them (same images as an uninterrupted run), another command starts over."""
    from polybridge.pipeline import PolyBridgePipeline

    prompts = tmp_path / "p.txt"
    prompts.write_text("红色的圆\n蓝色的方块\n绿色的三角形\n", encoding="utf-8")
    argv = ["--registry", str(tiny_registry), "generate", "--file", str(prompts), "--lang", "zh", "--steps", "1",
            "--batch-size", "1", "--out"]
    real, calls = PolyBridgePipeline.__call__, []

    def interrupted_at_the_second_batch(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PolyBridgePipeline, "__call__", interrupted_at_the_second_batch)
    code, _, err = run_cli(capsys, *argv, str(tmp_path / "set"))
    assert code == 130 and "1 of 3 images are in" in err and "run the same command again" in err
    assert not (tmp_path / "set").exists() and (tmp_path / ".set.partial" / "000000.png").is_file()
    monkeypatch.setattr(PolyBridgePipeline, "__call__", real)
    code, _, err = run_cli(capsys, *argv, str(tmp_path / "set"))
    assert code == 0 and "resuming: 1 of 3 images are already in" in err
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert not (tmp_path / ".set.partial").exists()
    code, _, err = run_cli(capsys, *argv, str(tmp_path / "whole"))
    assert code == 0
    for name in ("000000.png", "000001.png", "000002.png"):
        assert (tmp_path / "set" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    (tmp_path / ".other.partial").mkdir()
    (tmp_path / ".other.partial" / "polybridge-generate.json").write_text("another command\n")
    code, _, err = run_cli(capsys, *argv[:-1], "--seed", "1", "--out", str(tmp_path / "other"))
    assert code == 0 and "an interrupted run of other prompts or settings" in err


@counts("mistakes", 2)
@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "unreachable"])
def test_mistakes_family_a_hub_backbone_offline_says_so_at_once(registry_copy, monkeypatch, why):
    """A hub id that is not cached, with no hub to reach: one line naming the repository, the key and what to do,
    in well under the 35 s of retries that once ended in "config.json not found"."""
    import huggingface_hub.constants

    from polybridge.backbones import base, load_backbone

    if why == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(base, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(registry_copy.parent / "hf-home"))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(registry_copy.parent / "hf-home" / "hub"))
    started = time.monotonic()
    with pytest.raises(PolyBridgeError) as info:
        load_backbone(registry_copy, "sd15")
    text = one_line(info.value)
    assert "not in the local Hugging Face cache" in text and "backbones.sd15.source" in text, text
    assert ("HF_HUB_OFFLINE is set" in text) == (why == "HF_HUB_OFFLINE") and time.monotonic() - started < 5


# --------------------------------------------------------------------------- the counts


MINIMUM = {"limits": 3, "registry": 20, "bombs": 8, "numbers": 30, "weights": 15, "text": 25, "outputs": 8,
           "leftovers": 8, "validate": 3, "mistakes": 4}


def test_campaign_covers_every_family():
    """Each family of issue 19 holds its cases (printed with ``-s``)."""
    print("\ncampaign cases per family:", ", ".join(f"{k} {v}" for k, v in sorted(FAMILIES.items())))
    for name, least in MINIMUM.items():
        assert FAMILIES.get(name, 0) >= least, (name, FAMILIES.get(name))
