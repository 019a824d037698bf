"""The command line: every command once, and bad input gives exit 2, one clear line, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polybridge.cli import main
from polybridge.registry import load_registry

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "polybridge.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("registry", "synth", "tokenizer"):
        assert command in proc.stdout


def test_subcommand_help_explains(capsys):
    with pytest.raises(SystemExit) as info:
        main(["synth", "render", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "scenes.jsonl" in out and "--seed" in out and "--split" in out


# --------------------------------------------------------------------------- registry


def test_registry_list_and_json(capsys):
    code, out, _ = run(capsys, "--registry", str(REPO), "registry", "list")
    assert code == 0
    for lang in ("en", "zh", "ja", "ko", "ru", "ar", "es", "hi", "fr", "de"):
        assert f"\n{lang} " in out
    code, out, _ = run(capsys, "--registry", str(REPO), "registry", "list", "--json")
    data = json.loads(out)
    assert [d["code"] for d in data["languages"]][:2] == ["en", "zh"]
    assert data["languages"][1]["concepts"] == ["lantern", "pagoda"]


def test_registry_show(capsys):
    code, out, _ = run(capsys, "--registry", str(REPO), "registry", "show", "ja", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["code"] == "ja" and data["encoder"]["model_class"] == "CLIPTextModel"
    code, out, _ = run(capsys, "--registry", str(REPO), "registry", "show", "ja")
    assert code == 0 and "native_name: 日本語" in out


def test_registry_show_unknown_code(capsys):
    code, _, err = run(capsys, "--registry", str(REPO), "registry", "show", "xx")
    assert code == 2
    assert "unknown language code 'xx'" in err and "valid: en, zh" in err


def test_registry_validate(capsys):
    code, out, _ = run(capsys, "--registry", str(REPO), "registry", "validate", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["valid"] is True
    assert all(v["grammar"] == "ok" for v in data["languages"].values())


def test_registry_validate_reports_corrupt_file(capsys, registry_copy):
    (registry_copy.parent / "languages/ko/language.yaml").write_text("code: ko\nname: [unclosed\n")
    code, _, err = run(capsys, "--registry", str(registry_copy), "registry", "validate")
    assert code == 2
    assert "languages/ko/language.yaml" in err and "not valid YAML" in err


def test_registry_add_scaffolds_a_valid_language(capsys, registry_copy):
    root = registry_copy.parent
    code, out, err = run(capsys, "--registry", str(registry_copy), "registry", "add", "pt", "--name", "Portuguese",
                         "--native-name", "Português")
    assert code == 0, err
    assert (root / "languages/pt/language.yaml").is_file() and (root / "languages/pt/grammar.yaml").is_file()
    reg = load_registry(registry_copy)
    assert reg.codes[-1] == "pt"
    assert reg.language("pt").branch.type == "bdm"
    # The template is commented, and the edit kept registry.yaml's comments.
    assert "#" in (root / "languages/pt/language.yaml").read_text()
    assert registry_copy.read_text().startswith("# polybridge registry")
    code, _, _ = run(capsys, "--registry", str(registry_copy), "registry", "validate")
    assert code == 0
    # Adding it again is refused.
    code, _, err = run(capsys, "--registry", str(registry_copy), "registry", "add", "pt", "--name", "Portuguese")
    assert code == 2 and "already registered" in err


@pytest.mark.parametrize("argv, words", [
    (["add", "pt", "--name", "Portuguese", "--scripts", "Latn"], "unknown script 'Latn'"),
    (["add", "pt", "--name", "Portuguese", "--branch", "lora"], "unknown branch type 'lora'"),
    (["add", "pt", "--name", "Portuguese", "--concepts", "lantern"], "already owned by 'zh'"),
    (["add", "Portuguese", "--name", "Portuguese"], "not a language code"),
])
def test_registry_add_bad_input_writes_nothing(capsys, registry_copy, argv, words):
    before = registry_copy.read_text()
    folders = sorted(p.name for p in (registry_copy.parent / "languages").iterdir())
    code, _, err = run(capsys, "--registry", str(registry_copy), "registry", *argv)
    assert code == 2 and words in err
    assert registry_copy.read_text() == before
    assert sorted(p.name for p in (registry_copy.parent / "languages").iterdir()) == folders


# --------------------------------------------------------------------------- synth


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_synth_render_writes_pngs_and_scenes(capsys, tmp_path):
    out = tmp_path / "zh"
    code, stdout, err = run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "zh", "-n", "6",
                            "--seed", "3", "--out", str(out))
    assert code == 0, err
    rows = _jsonl(out / "scenes.jsonl")
    assert len(rows) == 6
    assert sorted(p.name for p in out.glob("*.png") if p.name[0].isdigit()) == [f"{i:06d}.png" for i in range(6)]
    assert all(r["lang"] == "zh" and r["caption"] for r in rows)
    # Same seed, same scenes and captions.
    out2 = tmp_path / "zh2"
    run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "zh", "-n", "6", "--seed", "3", "--out", str(out2))
    assert _jsonl(out2 / "scenes.jsonl") == rows
    assert (out / "000004.png").read_bytes() == (out2 / "000004.png").read_bytes()


def test_synth_render_mixed(capsys, tmp_path):
    out = tmp_path / "mix"
    code, _, err = run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "en", "--mix", "zh", "-n", "12",
                       "--out", str(out))
    assert code == 0, err
    two = [r for r in _jsonl(out / "scenes.jsonl") if len(r["scene"]["objects"]) == 2]
    assert two, "12 scenes should include two-object ones"
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in r["caption"]) for r in two)


@pytest.mark.parametrize("argv, words", [
    (["--lang", "xx", "-n", "2"], "unknown language code 'xx'"),
    (["--lang", "zh", "-n", "0"], "must be at least 1"),
    (["--lang", "zh", "-n", "-3"], "must be at least 1"),
])
def test_synth_render_bad_input(capsys, tmp_path, argv, words):
    out = tmp_path / "out"
    try:
        code = main(["--registry", str(REPO), "synth", "render", *argv, "--out", str(out)])
    except SystemExit as exc:  # argparse rejects bad values itself, with exit code 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and words in err
    assert not out.exists()
    assert not any(tmp_path.iterdir()), "nothing may be left behind"


def test_synth_render_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "ja", "-n", "2",
                       "--out", str(blocker / "sub"))
    assert code == 2 and str(blocker) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_synth_render_refuses_non_empty_out(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "ja", "-n", "2", "--out", str(out))
    assert code == 2 and "not empty" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_corrupted_registry_gives_exit_2(capsys, tmp_path):
    (tmp_path / "registry.yaml").write_text("backbones: {tiny: [oops\n")
    code, _, err = run(capsys, "--registry", str(tmp_path), "synth", "render", "--lang", "zh", "-n", "2",
                       "--out", str(tmp_path / "o"))
    assert code == 2 and "registry.yaml" in err and "not valid YAML" in err
    assert not (tmp_path / "o").exists()


def test_synth_score_reads_back_rendered_scenes(capsys, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "s"
    assert main(["--registry", str(REPO), "synth", "render", "--lang", "ko", "-n", "40", "--out", str(out)]) == 0
    capsys.readouterr()
    code, stdout, err = run(capsys, "synth", "score", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    acc = result["accuracy"]
    for attribute in ("background", "shape", "colour", "size", "position"):
        assert acc[attribute] >= 0.95, (attribute, acc)
    code, stdout, _ = run(capsys, "synth", "score", str(out))
    assert code == 0 and "colour" in stdout


def test_synth_score_missing_scenes_file(capsys, tmp_path):
    code, _, err = run(capsys, "synth", "score", str(tmp_path))
    assert code == 2 and "scenes.jsonl" in err


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_build_then_autotokenizer_loads(capsys, registry_copy):
    from transformers import AutoTokenizer

    code, out, err = run(capsys, "--registry", str(registry_copy), "tokenizer", "build", "--lang", "ru",
                         "--n-captions", "2000")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(registry_copy.parent / "languages/ru/tokenizer")
    text = "большой красный круг слева"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


# --------------------------------------------------------------------------- errors: one line, or a traceback


def _error_classes():
    from polybridge.bench.metrics import MetricError
    from polybridge.bench.runner import BenchError
    from polybridge.bench.suites import SuiteError
    from polybridge.cli import CommandError
    from polybridge.embedded.native_encoders import NativeEncoderError
    from polybridge.registry import RegistryError
    from polybridge.synthetic.grammar import GrammarError
    from polybridge.synthetic.scorer import ScorerError
    from polybridge.tokenizer import TokenizerError
    from polybridge.training.branch_data import DataError
    from polybridge.training.trainer import TrainingError

    return {RegistryError: ValueError, GrammarError: ValueError, TokenizerError: ValueError, DataError: ValueError,
            TrainingError: RuntimeError, NativeEncoderError: RuntimeError, ScorerError: RuntimeError,
            MetricError: RuntimeError, BenchError: ValueError, SuiteError: ValueError, CommandError: Exception}


def test_every_error_class_is_a_polybridge_error_and_keeps_its_builtin_base():
    from polybridge.errors import PolyBridgeError

    for cls, builtin in _error_classes().items():
        assert issubclass(cls, PolyBridgeError) and issubclass(cls, builtin), cls


def test_a_bug_is_not_a_one_line_error_but_its_traceback(capsys, monkeypatch):
    import polybridge.cli.registry as group

    def broken(args):
        return {}["missing"]  # a KeyError: polybridge's bug, not the user's

    monkeypatch.setattr(group, "cmd_registry_list", broken)
    with pytest.raises(KeyError):
        main(["--registry", str(REPO), "registry", "list"])
    assert "polybridge: error" not in capsys.readouterr().err

    def value_bug(args):
        raise ValueError("a ValueError from polybridge's own code is a bug too")

    monkeypatch.setattr(group, "cmd_registry_list", value_bug)
    with pytest.raises(ValueError, match="a bug too"):
        main(["--registry", str(REPO), "registry", "list"])


def test_a_bug_prints_its_traceback_from_the_console_script(tmp_path):
    code = ("import sys, polybridge.cli.registry as g\n"
            "def broken(args): raise RuntimeError('boom')\n"
            "g.cmd_registry_list = broken\n"
            "from polybridge.cli import main\n"
            f"sys.exit(main(['--registry', {str(REPO)!r}, 'registry', 'list']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: boom" in proc.stderr
    assert "polybridge: error" not in proc.stderr


def test_bad_values_in_library_calls_are_one_line_errors(capsys, tmp_path):
    code, _, err = run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "zh", "-n", "2", "--size", "4",
                       "--out", str(tmp_path / "s"))
    assert code == 2 and err.strip() == ("polybridge: error: size=4 is not valid; it must be an integer >= 8 "
                                         "(the image side in pixels)")
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "zh", "-n", "2",
                       "--out", str(tmp_path / "file" / "s"))
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_the_system_refusing_a_user_named_path_is_one_line_naming_it(capsys, tmp_path, monkeypatch):
    import polybridge.synthetic.dataset as dataset

    out = tmp_path / "s"

    def refuse(target, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".s.tmp-abc"))

    monkeypatch.setattr(dataset, "render_to_dir", refuse)
    code, _, err = run(capsys, "--registry", str(REPO), "synth", "render", "--lang", "zh", "-n", "2", "--out", str(out))
    assert code == 2
    assert err.strip() == f"polybridge: error: --out {out}: Permission denied ({tmp_path / '.s.tmp-abc'})"

    def elsewhere(target, *args, **kwargs):
        raise PermissionError(13, "Permission denied", "/somewhere/polybridge/did/not/expect")

    monkeypatch.setattr(dataset, "render_to_dir", elsewhere)
    with pytest.raises(PermissionError):  # not a path the user named: a bug, with its traceback
        main(["--registry", str(REPO), "synth", "render", "--lang", "zh", "-n", "2", "--out", str(out)])
