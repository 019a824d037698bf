"""Native text encoders of the embedded default: a 3-step smoke train, its saved folder, resume, errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polybridge.registry import load_registry
from polybridge.synthetic.world import OBJECTS, Scene, SceneObject
from polybridge.embedded import native_encoders as N
from polybridge.training.checkpoint import checkpoint_step

from conftest import copy_registry

LANG = "zh"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A copy of the registry with the tokenizers (the encoder folders are written into the copy)."""
    root = tmp_path_factory.mktemp("repo")
    return load_registry(copy_registry(root, with_artifacts=True))


@pytest.fixture(scope="module")
def trained(registry, tmp_path_factory):
    """One uninterrupted smoke run: (output folder, work folder, returned info)."""
    base = tmp_path_factory.mktemp("native")
    cfg = N.NativeEncoderConfig.smoke()
    info = N.train_native_encoder(registry, LANG, base / "encoder", base / "work", cfg, progress=False,
                                  command="pytest", log=lambda _: None)
    return base / "encoder", base / "work", info


def test_saved_encoder_loads_with_plain_transformers(trained, registry):
    from transformers import AutoTokenizer, CLIPTextModel

    out, _, info = trained
    cfg = N.NativeEncoderConfig.smoke()
    model = CLIPTextModel.from_pretrained(str(out), local_files_only=True)
    assert model.dtype == torch.float32, "the config must record float32 although the weights are stored in fp16"
    assert model.config.hidden_size == cfg.hidden_size != 64, "the native width differs from the backbone's (64)"
    assert model.config.eos_token_id == 3 and model.config.pad_token_id == 0
    stored = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    tok = AutoTokenizer.from_pretrained(str(registry.language(LANG).tokenizer_source), local_files_only=True)
    batch = tok(["在黑色背景上有一个红色的大圆形"], padding="max_length", max_length=64, return_tensors="pt")
    states = model(**batch).last_hidden_state
    assert states.shape == (1, 64, cfg.hidden_size) and torch.isfinite(states).all()
    # safetensors only, anywhere in the folder
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")], files
    assert (out / "contrastive" / "model.safetensors").is_file()
    record = json.loads((out / N.INFO_FILE).read_text())
    assert record["language"] == LANG and record["steps"] == 3 and record["command"] == "pytest"
    assert record["config"]["hidden_size"] == cfg.hidden_size
    assert {"retrieval_top1", "text_probe", "token_probe"} <= set(record["metrics"])
    assert info["metrics"] == record["metrics"]


def test_contrastive_folder_round_trips_and_evaluates(trained, registry):
    out, _, info = trained
    clip = N.ContrastiveModel.from_pretrained(out)
    assert clip.cfg == N.NativeEncoderConfig.smoke()
    images = torch.zeros(2, 3, 32, 32)
    assert clip.encode_image(images).shape == (2, clip.cfg.projection_dim)
    metrics = N.evaluate_native_encoder(registry, LANG, out, n_scenes=16, batch=8)
    assert 0.0 <= metrics["retrieval_top1"] <= 1.0 and metrics["retrieval_batch"] == 8
    assert set(metrics["text_probe"]) >= {"background", "shape", "colour", "size", "scene"}


def test_resume_after_a_kill_gives_the_same_weights(trained, registry, tmp_path):
    out_full, work_full, _ = trained
    cfg = N.NativeEncoderConfig.smoke()
    out, work = tmp_path / "encoder", tmp_path / "work"

    class Killed(Exception):
        pass

    def kill_at_2(step, losses):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        N.train_native_encoder(registry, LANG, out, work, cfg, progress=False, callback=kill_at_2, log=lambda _: None)
    assert checkpoint_step(work / "checkpoint") == 2
    assert not out.exists(), "nothing is written to the output folder before training ends"
    logged = []
    N.train_native_encoder(registry, LANG, out, work, cfg, progress=False, log=logged.append)
    assert any("resuming at step 2" in line for line in logged), logged
    assert checkpoint_step(work / "checkpoint") == 3
    full = load_file(str(work_full / "checkpoint" / "model.safetensors"))
    resumed = load_file(str(work / "checkpoint" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    a, b = load_file(str(out_full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_in_the_same_work_folder_are_refused(trained, registry, tmp_path):
    _, work, _ = trained
    other = replace(N.NativeEncoderConfig.smoke(), lr=1e-4)
    with pytest.raises(N.NativeEncoderError, match="settings.json"):
        N.train_native_encoder(registry, LANG, tmp_path / "enc", work, other, progress=False)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    registry = load_registry(copy_registry(tmp_path / "repo", with_artifacts=True))
    tok_dir = registry.language(LANG).tokenizer_source
    shutil.rmtree(tok_dir)
    with pytest.raises(N.NativeEncoderError) as err:
        N.train_native_encoder(registry, LANG, tmp_path / "enc", tmp_path / "work", N.NativeEncoderConfig.smoke(),
                               progress=False)
    assert str(tok_dir) in str(err.value) and "tokenizer" in str(err.value)
    assert not (tmp_path / "work").exists(), "the tokenizer is checked before any work is done"


def test_text_targets_mark_concepts_the_language_does_not_name():
    scene = Scene("black", (SceneObject("lantern", "red", "small", "left"), SceneObject("torii", "blue", "large", "right")))
    zh = N.text_targets([scene], ("lantern", "pagoda"))["objects"][0].tolist()
    assert zh[0] == OBJECTS.index("lantern") and zh[1] == N.UNNAMED_CLASS and zh[2:] == [N.EMPTY_CLASS] * 3


def test_captions_that_say_the_same_thing_are_not_negatives():
    a = Scene("black", (SceneObject("torii", "red", "small", "left"),))
    b = Scene("black", (SceneObject("daruma", "red", "small", "left"),))  # both "an object" in Chinese
    c = Scene("gray", (SceneObject("circle", "red", "small", "left"),))
    same = N.same_described(N.text_targets([a, b, c], ("lantern", "pagoda")))
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    together = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # a and b embedded alike
    apart = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.3], [0.0, 1.0]]), dim=-1)
    scale, eye = torch.tensor(4.0), torch.eye(3, dtype=torch.bool)
    # with b as a positive of a, embedding them alike is what the loss wants; plain InfoNCE pushes them apart
    assert N.contrastive_loss(together, together, scale, same) < N.contrastive_loss(apart, apart, scale, same)
    assert N.contrastive_loss(together, together, scale, eye) > N.contrastive_loss(apart, apart, scale, eye)


def test_build_script_help():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "build_encoders.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--langs", "--steps", "--smoke", "--work", "--threads", "--seed", "--world-clip"):
        assert flag in result.stdout
