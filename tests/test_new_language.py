"""A language polybridge has never seen, end to end through the command line, with no code change:
register it, give it a grammar, build its tokenizer and a tiny encoder, train its branch, generate."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from PIL import Image

from conftest import REPO, registry_with_tiny_backbone
from polybridge.cli import main

GRAMMAR = Path(__file__).parent / "data" / "new_language" / "grammar.yaml"


def _cli(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _build_encoders_script():
    spec = importlib.util.spec_from_file_location("build_encoders", REPO / "scripts" / "build_encoders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_add_a_language_and_train_it_from_the_command_line(tmp_path, capsys):
    registry = str(registry_with_tiny_backbone(tmp_path / "repo"))
    folder = tmp_path / "repo" / "languages" / "it"
    _cli(capsys, "--registry", registry, "registry", "add", "it", "--name", "Italian", "--native-name", "Italiano",
         "--scripts", "Latin")

    # Fill the entry (small training settings for a test) and write the grammar: data, not code.
    entry = (folder / "language.yaml").read_text(encoding="utf-8")
    for old, new in (("max_steps: 2500", "max_steps: 4"), ("batch_size: 64", "batch_size: 4"),
                     ("warmup_steps: 100", "warmup_steps: 1"), ("checkpoint_every: 250", "checkpoint_every: 2"),
                     ("num_samples: 20000", "num_samples: 32")):
        assert old in entry
        entry = entry.replace(old, new)
    (folder / "language.yaml").write_text(entry, encoding="utf-8")
    shutil.copy(GRAMMAR, folder / "grammar.yaml")
    _cli(capsys, "--registry", registry, "registry", "validate")
    rendered = tmp_path / "render"
    _cli(capsys, "--registry", registry, "synth", "render", "--lang", "it", "-n", "2", "--out", str(rendered))
    assert "sfondo" in (rendered / "scenes.jsonl").read_text(encoding="utf-8")

    # Its tokenizer and its tiny native encoder, with the project's own commands.
    _cli(capsys, "--registry", registry, "tokenizer", "build", "--lang", "it", "--n-captions", "2000")
    assert _build_encoders_script().main(["--registry", registry, "--langs", "it", "--smoke",
                                          "--work", str(tmp_path / "encoders"), "--no-progress"]) == 0
    capsys.readouterr()
    assert (folder / "encoder" / "config.json").is_file()

    # Its branch, from the entry; then an image from an Italian prompt.
    trained = json.loads(_cli(capsys, "--registry", registry, "train", "--lang", "it", "--no-progress", "--json"))
    assert trained["steps"] == 4 and trained["branch_type"] == "bdm" and (folder / "branch" / "config.json").is_file()
    out = tmp_path / "cerchio.png"
    record = json.loads(_cli(capsys, "--registry", registry, "generate", "un cerchio rosso grande a sinistra",
                             "--lang", "it", "-n", "1", "--steps", "2", "--upscale", "1", "-o", str(out), "--json"))
    assert record["trained_branch"] is True and record["language"] == "it"
    assert Image.open(out).size == (16, 16)
    listed = json.loads(_cli(capsys, "--registry", registry, "registry", "list", "--json"))
    it = next(row for row in listed["languages"] if row["code"] == "it")
    assert it["status"] == {"tokenizer": "present", "encoder": "present", "branch": "present"}
