"""The benchmark run, its metrics, report and command line, on a tiny random backbone built in code.

The registry is a copy of the real one (entries, grammars, native encoders) whose backbone is the 16x16
random model of ``tiny_components``; zh gets a (perturbed) bdm branch where its entry points, ja a pea
branch passed with ``weights``, ko loses its encoder: every way a cell can run or be skipped shows up.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, registry_with_tiny_backbone, save_bench_branches
from polybridge.bench.metrics import MetricError, clip_score, fid, load_clip, load_world_clip
from polybridge.bench.report import write_report
from polybridge.bench.runner import BenchError, BenchSettings, check_request, naive_swap_branch, run_bench
from polybridge.cli import main
from polybridge.registry import load_registry
from polybridge.synthetic.render import render_scene
from polybridge.synthetic.scenes import sample_scenes

WORLD_CLIP = REPO / "polybridge" / "assets" / "world-clip"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A registry with the tiny backbone: zh bdm branch at its entry's path, a ja pea branch elsewhere, no ko
    encoder; zh's and ko's curated prompts are scored with the world CLIP, ja names no CLIP model."""
    root = tmp_path_factory.mktemp("bench") / "repo"
    registry_file = registry_with_tiny_backbone(root)
    shutil.rmtree(root / "languages/ko/encoder")
    for code in ("zh", "ja", "ko"):  # no hub id: nothing here may try the network
        file = root / f"languages/{code}/language.yaml"
        file.write_text(file.read_text(encoding="utf-8").replace(
            "clip_model: BAAI/AltCLIP-m18", "clip_model: null" if code == "ja" else f"clip_model: {WORLD_CLIP}"),
            encoding="utf-8")
    save_bench_branches(registry_file)
    return registry_file


@pytest.fixture(scope="module")
def result(tiny):
    settings = BenchSettings(languages=("zh", "ja", "ko"), n=2, curated_n=2, steps=1, grid_columns=2,
                             suites=("general", "culture", "curated"),
                             weights={("ja", "pea"): str(Path(tiny).parent / "ja-pea")})
    return run_bench(load_registry(tiny), settings, progress=False)


def _cell(result, suite, code, method):
    return next(c for c in result.cells if (c.suite, c.language, c.method) == (suite, code, method))


def test_every_cell_runs_or_says_why(result):
    ok = {(c.suite, c.language, c.method) for c in result.cells if c.status == "ok"}
    assert len(result.cells) == 3 * 3 * 5
    for code in ("zh", "ja", "ko"):
        for suite in ("general", "culture"):
            assert {(suite, code, "english-reference"), (suite, code, "translate")} <= ok
    for suite in ("general", "culture"):
        assert {(suite, "zh", "naive-swap"), (suite, "zh", "bdm"), (suite, "ja", "naive-swap"),
                (suite, "ja", "pea")} <= ok
    assert "--weights zh:pea=DIR" in _cell(result, "general", "zh", "pea").reason
    assert "no trained bdm branch" in _cell(result, "culture", "ja", "bdm").reason
    assert "no native encoder" in _cell(result, "general", "ko", "naive-swap").reason
    assert "synthetic world only" in _cell(result, "curated", "zh", "translate").reason
    assert "benchmark.clip_model" in _cell(result, "curated", "ja", "english-reference").reason
    assert _cell(result, "curated", "ko", "english-reference").status == "ok"
    assert "no native encoder" in _cell(result, "curated", "ko", "naive-swap").reason
    assert all(c.reason for c in result.cells if c.status != "ok")


def test_metrics_of_a_cell(result):
    culture = _cell(result, "culture", "zh", "bdm")
    assert culture.n == 2
    for key in ("accuracy", "shape", "colour", "size", "position", "background", "scene", "clip_t", "clip_i", "fid"):
        assert isinstance(culture.metrics[key], float) and math.isfinite(culture.metrics[key]), key
    assert set(culture.metrics["per_concept"]) == {"lantern", "pagoda"}
    assert "concept" in culture.metrics and "concept" not in _cell(result, "general", "zh", "bdm").metrics
    curated = _cell(result, "curated", "zh", "naive-swap")
    assert curated.n == 2 and math.isfinite(curated.metrics["clip_t"])
    assert set(curated.metrics["per_category"]) == {"painting", "literature"}
    assert curated.metrics["clip_model"] == str(WORLD_CLIP)


def test_general_english_reference_is_shared_and_grids_hold_every_method(result):
    refs = [_cell(result, "general", code, "english-reference").metrics for code in ("zh", "ja", "ko")]
    assert refs[0]["fid"] == refs[1]["fid"] == refs[2]["fid"]
    assert "shared_with" in refs[1] and "shared_with" not in refs[0]
    grid = next(g for g in result.grids if (g.suite, g.language) == ("culture", "zh"))
    assert list(grid.rows) == ["ground truth", "english-reference", "translate", "naive-swap", "bdm"]
    assert all(len(images) == 2 for images in grid.rows.values())
    assert grid.inputs["translation"][0] and grid.inputs["prompt"][0] != grid.inputs["english"][0]


def test_naive_swap_projection_is_seeded_per_language(tiny):
    from polybridge.backbones import load_backbone
    from polybridge.encoders import load_encoder

    reg = load_registry(tiny)
    unet, encoder = load_backbone(reg).unet, load_encoder(reg.language("zh"))
    a, b = naive_swap_branch(unet, encoder, "zh", 0), naive_swap_branch(unet, encoder, "zh", 0)
    c = naive_swap_branch(unet, encoder, "ja", 0)
    assert torch.equal(a.mlp[-1].weight, b.mlp[-1].weight) and not torch.equal(a.mlp[-1].weight, c.mlp[-1].weight)
    states = encoder.encode(["左边有一个红色的圆形"])
    assert a(states).abs().sum() > 0 and a(states).shape[-1] == unet.config.cross_attention_dim


def test_report_is_written_whole(result, tmp_path):
    out = write_report(result, tmp_path / "report")
    md = (out / "report.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    table = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "| language | english-reference | translate | naive-swap | bdm | pea |" in md
    assert "## Skipped" in md and "no native encoder" in md and "generation_seed" in md
    assert "![culture: bar plots per metric](plots/culture.png)" in md
    assert html.count("data:image/png;base64,") == len(list(out.glob("*/*.png"))) and "src=\"images/" not in html
    assert (out / "images/culture-zh.png").is_file() and (out / "plots/general.png").is_file()
    assert (out / "images/curated-ko.png").is_file() and not (out / "images/curated-ja.png").exists()  # none ran
    assert len(table["cells"]) == 45 and table["settings"]["steps"] == 1 and table["seconds"] > 0
    with pytest.raises(FileExistsError):
        write_report(result, out)  # a finished report is never overwritten by accident
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_request_errors_list_what_is_valid(tiny):
    reg = load_registry(tiny)
    for settings, words in [(BenchSettings(languages=("xx",)), "unknown language 'xx'; valid: zh, ja"),
                            (BenchSettings(languages=("en",)), "backbone's language"),
                            (BenchSettings(methods=("dalle",)), "valid: english-reference, translate, naive-swap"),
                            (BenchSettings(suites=("mg18",)), "valid: general, culture, curated"),
                            (BenchSettings(weights={("zh", "naive-swap"): "x"}), "valid: bdm, pea"),
                            (BenchSettings(steps=0), "steps must be at least 1")]:
        with pytest.raises(BenchError, match=words.replace("(", r"\(").replace(")", r"\)")):
            check_request(reg, settings)


# --------------------------------------------------------------------------- metrics


def test_world_clip_metrics_separate_right_from_wrong():
    world = load_world_clip()
    scenes = sample_scenes(8, 0, "test")
    images = [render_scene(s, 32) for s in scenes]
    others = [render_scene(s, 32) for s in sample_scenes(8, 1, "test")]
    assert clip_score(world, images, images) == pytest.approx(100.0, abs=0.01)
    assert clip_score(world, images, others) < 60
    features = world.features()
    assert abs(fid(features, images, images)) < 1e-2 and fid(features, images, others) > 10
    assert math.isnan(fid(features, images[:1], others))
    small = [im.resize((16, 16)) for im in images]  # generated images of another size are resized
    assert clip_score(world, small, images) > 50


def test_registry_named_transformers_clip_loads_and_scores(tmp_path):
    """The real-deployment path (AltCLIP, Chinese-CLIP, CLIP): AutoModel + AutoProcessor from the registry's
    source, scored by torchmetrics' CLIPScore; here a tiny CLIPModel saved in code."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tiny_components import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "bos_token_id": 512,
                                     "eos_token_id": 513, "pad_token_id": 513},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16),
                  tokenizer=clip_tokenizer()).save_pretrained(tmp_path / "clip")
    bundle = load_clip(tmp_path / "clip")
    images = [render_scene(s, 32) for s in sample_scenes(3, 0, "test")]
    score = clip_score(bundle, images, ["水墨山水画", "a red circle", "Der Kölner Dom"])
    assert math.isfinite(score)
    with pytest.raises(MetricError, match="FID features come from the world CLIP"):
        bundle.features()
    with pytest.raises(MetricError, match=str(tmp_path / "nothing")):
        load_clip(tmp_path / "nothing")


# --------------------------------------------------------------------------- the command


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, words", [
    (["--langs", "xx"], "--langs: 'xx' is not a registered language; valid: zh, ja, ko, ru, ar, es, hi, fr, de"),
    (["--langs", "zh,en"], "--langs: 'en' is the backbone's language"),
    (["--methods", "dalle"], "--methods: unknown method 'dalle'; valid: english-reference, translate, naive-swap, bdm, pea"),
    (["--suites", "mg18"], "--suites: unknown suite 'mg18'; valid: general, culture, curated"),
    (["--weights", "zh-pea"], "--weights: 'zh-pea' is not CODE:METHOD=DIR"),
    (["--device", "gpu0"], "--device: 'gpu0' is not a torch device"),
    *([(["--device", "cuda"], "--device: 'cuda', but this torch build sees no CUDA device")]
      if not torch.cuda.is_available() else []),
])
def test_bench_bad_arguments(capsys, registry_copy, tmp_path, argv, words):
    code, out, err = run(capsys, "--registry", str(registry_copy), "bench", *argv, "--out", str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert err.strip() == f"polybridge: error: {words}" or words in err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_bench_unwritable_or_occupied_output(capsys, registry_copy, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run(capsys, "--registry", str(registry_copy), "bench", "--out", str(blocker / "report"))
    assert code == 2 and "--out: " in err and "is a file, not a folder" in err
    occupied = tmp_path / "old"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "--registry", str(registry_copy), "bench", "--out", str(occupied))
    assert code == 2 and "not empty (use overwrite / --overwrite" in err
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_bench_without_a_backbone_is_one_clear_error(capsys, registry_copy, tmp_path):
    code, out, err = run(capsys, "--registry", str(registry_copy), "bench", "--langs", "zh", "--quick",
                         "--out", str(tmp_path / "r"))
    assert code == 2 and "backbone 'polybridge-tiny'" in err and "build_default.py" in err
    assert not (tmp_path / "r").exists()


def test_bench_command_json(capsys, tiny, tmp_path):
    code, out, err = run(capsys, "--registry", str(tiny), "bench", "--langs", "zh", "ko", "--methods",
                         "english-reference", "naive-swap", "bdm", "--suites", "culture", "-n", "2", "--steps", "1",
                         "--out", str(tmp_path / "r"), "--json")
    assert code == 0, err
    table = json.loads(out)
    assert table["out"] == str(tmp_path / "r") and (tmp_path / "r" / "report.html").is_file()
    status = {(c["language"], c["method"]): c["status"] for c in table["cells"]}
    assert status == {("zh", "english-reference"): "ok", ("zh", "naive-swap"): "ok", ("zh", "bdm"): "ok",
                      ("ko", "english-reference"): "ok", ("ko", "naive-swap"): "skipped", ("ko", "bdm"): "skipped"}
    assert table["settings"]["steps"] == 1 and table["settings"]["generation_seed"] == 0


def test_same_settings_same_numbers(tiny):
    settings = BenchSettings(languages=("zh",), methods=("english-reference", "naive-swap", "bdm"), suites=("culture",),
                             n=2, steps=1)
    first, second = (run_bench(load_registry(tiny), settings, progress=False) for _ in range(2))
    assert [c.metrics for c in first.cells] == [c.metrics for c in second.cells]
    assert all(c.status == "ok" for c in first.cells)


@pytest.mark.slow
def test_quick_run_on_the_embedded_default_fits_in_five_minutes(tmp_path):
    """The acceptance check of `polybridge bench --quick` (needs the built polybridge-tiny)."""
    import time

    reg = load_registry(REPO)
    started = time.time()
    result = run_bench(reg, BenchSettings(quick=True), progress=False)
    write_report(result, tmp_path / "quick")
    assert time.time() - started < 300
    assert any(c.status == "ok" for c in result.cells)
