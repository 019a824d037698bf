"""The plugins suite of `polybridge bench`: plugins made in code (a random LoRA, ControlNet and Textual Inversion) on
the tiny random backbone, in a registry written here; the plugin scorer is the committed scene scorer's network
widened (`PluginScorer.from_scene_scorer`), so nothing waits on trained toy plugins or their scorer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import registry_with_tiny_backbone, save_bench_branches
from plugin_fixtures import make_controlnet, make_lora, make_ti

from polybridge.bench import plugins as bench_plugins
from polybridge.bench.plugins import (
    CONTENT,
    PLUGIN_SUITE,
    PluginRow,
    compatibility,
    judge,
    moved_scene,
    plugin_rows,
    plugin_scenes,
)
from polybridge.bench.report import write_report
from polybridge.bench.runner import BenchSettings, run_bench
from polybridge.registry import load_registry
from polybridge.synthetic.scenes import scene_rng
from polybridge.synthetic.world import POSITIONS

pytest.importorskip("peft")

ROWS = [r.name for r in plugin_rows()]


def _scorer():
    from polybridge.synthetic.plugin_scorer import PluginScorer
    from polybridge.synthetic.scorer import load_default_scorer

    return PluginScorer.from_scene_scorer(load_default_scorer()).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny backbone (its scheduler as polybridge-tiny's) with a zh bdm branch (its entry's), a ja pea branch
    (passed as weights), ko without a branch; plugins: a LoRA, a ControlNet and a Textual Inversion made in code, and a checkpoint listed but missing."""
    from diffusers import DPMSolverMultistepScheduler
    from tiny_components import get_dummy_components

    root = tmp_path_factory.mktemp("pbench") / "repo"
    components = get_dummy_components()  # with polybridge-tiny's kind of scheduler: v-prediction, zero terminal SNR
    components["scheduler"] = DPMSolverMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                          timestep_spacing="trailing", final_sigmas_type="zero",
                                                          steps_offset=1)
    registry_file = registry_with_tiny_backbone(root, components)
    unet = save_bench_branches(registry_file)
    make_lora(unet, root / "plugins/outline")
    make_controlnet(unet).save_pretrained(root / "plugins/layout")
    make_ti(root / "plugins/kite.safetensors", "<kite>", vectors=2, width=unet.config.cross_attention_dim)
    top = yaml.safe_load(registry_file.read_text(encoding="utf-8"))
    top["plugins"] = {
        "outline-lora": {"kind": "lora", "source": "./plugins/outline"},
        "layout-controlnet": {"kind": "controlnet", "source": "./plugins/layout"},
        "kite-ti": {"kind": "textual_inversion", "source": "./plugins/kite.safetensors", "token": "<kite>"},
        "navy-checkpoint": {"kind": "checkpoint", "source": "./plugins/navy"},  # not on disk
    }
    registry_file.write_text(yaml.safe_dump(top, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return registry_file


def _settings(tiny: Path, **kw) -> BenchSettings:
    kw = {"n": 2, **kw}
    return BenchSettings(languages=("zh", "ja", "ko"), methods=("bdm", "pea"), suites=(PLUGIN_SUITE,), steps=1,
                         grid_columns=2, weights={("ja", "pea"): str(Path(tiny).parent / "ja-pea")}, **kw)


@pytest.fixture(scope="module")
def result(tiny):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("polybridge.synthetic.plugin_scorer.load_plugin_scorer", _scorer)
        return run_bench(load_registry(tiny), _settings(tiny), progress=False)


def _cell(result, plugin, code, method):
    return next(c for c in result.cells if (c.plugin, c.language, c.method) == (plugin, code, method))


def test_every_plugin_cell_runs_or_says_why(result):
    assert {c.suite for c in result.cells} == {PLUGIN_SUITE}
    assert len(result.cells) == len(ROWS) * (1 + 3 * 2)
    ran = {(c.plugin, c.language, c.method) for c in result.cells if c.status == "ok"}
    for row in ROWS:
        if row == "navy-checkpoint":
            continue
        assert {(row, "en", "english-reference"), (row, "zh", "bdm"), (row, "ja", "pea")} <= ran, row
        assert "no trained bdm branch" in _cell(result, row, "ko", "bdm").reason
        assert "--weights zh:pea=DIR" in _cell(result, row, "zh", "pea").reason
    for code, method in (("en", "english-reference"), ("zh", "bdm"), ("ja", "pea")):
        missing = _cell(result, "navy-checkpoint", code, method)
        assert missing.status == "skipped" and "does not exist" in missing.reason and "navy" in missing.reason
    assert all(c.reason for c in result.cells if c.status != "ok")


def test_compatibility_is_the_native_joint_over_the_english_joint(result):
    checked = 0
    for c in result.cells:
        if c.status != "ok" or c.method == "english-reference":
            continue
        english = _cell(result, c.plugin, "en", "english-reference").metrics
        m = c.metrics
        assert m["english_joint"] == english["joint"] and m["english_content"] == english["content"]
        row = next(r for r in plugin_rows() if r.name == c.plugin)
        if row.effect is None:
            assert math.isnan(m["effect"]) and m["joint"] == m["content"]
        else:
            assert m["joint"] <= min(m["effect"], m["content"]) + 1e-9
        assert set(CONTENT[row.effect]) <= set(m)
        want = m["joint"] / m["english_joint"] if m["english_joint"] else math.nan
        assert (math.isnan(want) and math.isnan(m["compatibility"])) or m["compatibility"] == pytest.approx(want)
        checked += 1
    assert checked == (len(ROWS) - 1) * 2


def test_the_plugin_is_applied_and_taken_off(result):
    """A plugin changes the images (else the suite would measure nothing), and after its row the pipelines are
    back: the DPM-Solver++ row is the backbone's own scheduler, so its images are exactly the no-plugin row's."""
    import numpy as np

    grids = {g.plugin: g for g in result.grids}
    assert set(grids) == set(ROWS) - {"navy-checkpoint"}
    none = grids["none"].rows
    for row in ("outline-lora", "layout-controlnet", "kite-ti", "ddim"):
        assert any(not np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(grids[row].rows["zh bdm"], none["zh bdm"])), row
    for side in ("en", "zh bdm", "ja pea"):
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(grids["dpm-solver++"].rows[side], none[side])), side
    assert list(grids["layout-controlnet"].rows)[:3] == ["ground truth", "hint", "en"]
    assert grids["kite-ti"].inputs["english"][0].endswith(", <kite>")


def test_judge_reads_effect_and_content_per_image():
    scenes = [s for _, s, _ in plugin_scenes(PluginRow("s", "lora", effect="style", target="outline"), 4)]

    def read(scene, **change):
        return {"background": change.get("background", scene.background),
                "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position,
                             "style": change.get("style", o.style)} for o in scene.objects]}

    style = PluginRow("outline-lora", "lora", "outline style", "style", "outline")
    right = judge(style, [read(s) for s in scenes], scenes, [None] * 4)
    assert right["effect"] == right["content"] == right["joint"] == 1.0
    half = judge(style, [read(s, style="solid") if i % 2 else read(s) for i, s in enumerate(scenes)], scenes, [None] * 4)
    assert half["effect"] == 0.5 and half["content"] == 1.0 and half["joint"] == 0.5
    navy = PluginRow("navy-checkpoint", "checkpoint", "", "background", "navy")
    plain = [s for _, s, _ in plugin_scenes(navy, 4)]
    assert all(s.background != "navy" for s in plain)
    out = judge(navy, [read(s, background="navy") for s in plain[:2]] + [read(s) for s in plain[2:]], plain, [None] * 4)
    assert out["effect"] == 0.5 and out["content"] == 1.0 and "background" not in out  # the plugin's own aside
    layout = PluginRow("layout-controlnet", "controlnet", "", "layout", "box")
    drawn = plugin_scenes(layout, 4)
    prompt, hints = [s for _, s, _ in drawn], [h for _, _, h in drawn]
    followed_prompt = judge(layout, [read(s) for s in prompt], prompt, hints)
    followed_hint = judge(layout, [read(h) for h in hints], prompt, hints)
    assert followed_prompt["effect"] == 0.0 and followed_hint["effect"] == followed_hint["joint"] == 1.0
    assert compatibility(0.3, 0.6) == pytest.approx(0.5) and math.isnan(compatibility(0.3, 0.0))


def test_moved_scene_puts_every_object_elsewhere():
    import math as m

    drawn = plugin_scenes(PluginRow("layout-controlnet", "controlnet", "", "layout", "box"), 40)
    assert any(len(s.objects) == 2 for _, s, _ in drawn) and any(len(s.objects) == 1 for _, s, _ in drawn)
    for i, scene, hint in drawn:
        assert hint == moved_scene(scene, scene_rng(bench_plugins.PLUGIN_SEED, "test", i, "plugin-layout"))
        assert all(a.position != b.position for a, b in zip(scene.objects, hint.objects))
        assert [(o.shape, o.colour, o.size) for o in scene.objects] == [(o.shape, o.colour, o.size) for o in hint.objects]
        if len(scene.objects) == 2:
            def gap(s):
                (a, b) = s.objects
                (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
                return m.hypot(ax + a.dx - bx - b.dx, ay + a.dy - by - b.dy)
            assert gap(hint) == pytest.approx(gap(scene))


def test_no_plugin_scorer_skips_the_suite_with_its_reason(tiny, monkeypatch):
    from polybridge.synthetic.scorer import ScorerError

    def missing():
        raise ScorerError("assets/plugin-scorer/model.safetensors: missing; build it with `python scripts/x.py`")

    monkeypatch.setattr("polybridge.synthetic.plugin_scorer.load_plugin_scorer", missing)
    notes: list[str] = []
    out = run_bench(load_registry(tiny), _settings(tiny, n=1), log=notes.append, progress=False)
    assert out.cells and all(c.status == "skipped" and "no plugin scorer" in c.reason for c in out.cells)
    assert any("plugins suite skipped" in n for n in notes)


def test_report_has_the_plugins_table_and_grids(result, tmp_path):
    out = write_report(result, tmp_path / "report")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Plugins" in md and f"| side | {' | '.join(ROWS)} |" in md
    table_md, skipped = md.split("## Plugins")[1].split("### All plugin figures")[0], md.split("## Skipped")[1]
    assert "| en (English prompts) |" in table_md and "| zh bdm |" in table_md and "| ja pea |" in table_md
    assert "ko bdm" not in table_md and "| skipped |" in table_md  # sides that never ran: in Skipped, with reasons
    assert "plugins/bdm/none" in skipped and "no trained bdm branch" in skipped
    assert "plugins/english-reference/navy-checkpoint" in skipped and "does not exist" in skipped
    zh = _cell(result, "outline-lora", "zh", "bdm").metrics
    assert f"{zh['compatibility']:.3f} ({zh['effect']:.3f} / {zh['content']:.3f})" in md or \
        math.isnan(zh["compatibility"])
    for row in set(ROWS) - {"navy-checkpoint"}:
        assert (out / f"images/plugins-{row}.png").is_file(), row
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Plugins</h2>" in html and html.count("data:image/png;base64,") == len(list(out.glob("*/*.png")))
    table = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cells = [c for c in table["cells"] if c.get("plugin") == "kite-ti" and c["language"] == "zh"]
    assert cells and "compatibility" in cells[0]["metrics"]
    shutil.rmtree(out)


def test_a_plugin_for_another_architecture_is_skipped_with_its_reason(tiny):
    """The same languages, a registry whose only plugin is a LoRA made for a wider backbone: that row is skipped
    and says why, the toy plugins it does not list are skipped as unlisted, the rest of the suite runs."""
    from tiny_components import get_dummy_components, save_backbone, tiny_unet

    root = Path(tiny).parent
    wide = get_dummy_components()
    wide["unet"] = tiny_unet(block_out_channels=(64, 128))
    save_backbone(wide, root / "wide")
    make_lora(wide["unet"], root / "plugins/wide-outline")
    top = yaml.safe_load(Path(tiny).read_text(encoding="utf-8"))
    top["backbones"]["wide"] = {"source": "./wide", "architecture": "sd1", "language": "en"}
    top["plugins"] = {"outline-lora": {"kind": "lora", "source": "./plugins/wide-outline", "backbone": "wide"}}
    other = root / "registry-wide.yaml"
    other.write_text(yaml.safe_dump(top, allow_unicode=True, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("polybridge.synthetic.plugin_scorer.load_plugin_scorer", _scorer)
        out = run_bench(load_registry(other), BenchSettings(languages=("zh",), methods=("bdm",), suites=(PLUGIN_SUITE,),
                                                            n=1, steps=1), progress=False)
    status = {(c.plugin, c.language): c for c in out.cells}
    for code in ("en", "zh"):
        assert status[("outline-lora", code)].status == "skipped"
        assert "another architecture" in status[("outline-lora", code)].reason
        assert "not listed" in status[("kite-ti", code)].reason
        assert status[("none", code)].status == status[("unipc", code)].status == "ok"
