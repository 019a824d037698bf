"""Checkpoint swap with branches kept, and plugins as data: the registry's ``plugins:`` section, `polybridge generate
--lora/--controlnet/--image/--ti/--backbone`, `registry list` and `validate`; on tiny components made in code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from plugin_fixtures import make_controlnet, make_lora, make_ti
from tiny_components import (
    get_dummy_components,
    native_encoder,
    perturb_,
    save_backbone,
    tiny_unet,
    write_registry,
)

from polybridge.backbones import load_backbone
from polybridge.branches import BDMBranch
from polybridge.cli import main
from polybridge.errors import PolyBridgeError
from polybridge.pipeline import PolyBridgePipeline
from polybridge.plugins import PluginError
from polybridge.plugins.use import check_plugin, use_plugins
from polybridge.registry import RegistryError, load_registry

pytest.importorskip("peft")

ZH = "红色的灯笼"
STEPS = 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A registry with two backbones of one architecture (the base and a fine-tune as an 'ft' variant), one of
    another architecture, and a plugin of each kind (plus some for the other architecture)."""
    root = tmp_path_factory.mktemp("plugreg")
    c = get_dummy_components()
    branch = perturb_(BDMBranch.from_unet(c["unet"], 48, encoder_name="./encoder"), seed=3)
    file = write_registry(root, c, {"zh": {"encoder": native_encoder(48), "branch": branch}})
    tuned = get_dummy_components()
    perturb_(tuned["unet"], seed=7, std=0.01)
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**tuned, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "tuned", variant="ft")
    wide = get_dummy_components()
    wide["unet"] = tiny_unet(block_out_channels=(64, 128))
    save_backbone(wide, root / "wide")
    plugins = root / "plugins"
    make_lora(c["unet"], plugins / "style")
    make_lora(wide["unet"], plugins / "wide-style")
    make_controlnet(c["unet"]).save_pretrained(plugins / "edges")
    make_controlnet(wide["unet"]).save_pretrained(plugins / "wide-edges")
    make_ti(plugins / "toy.safetensors", "<toy>", vectors=2)
    top = yaml.safe_load(file.read_text())
    top["backbones"]["tuned"] = {"source": "./tuned", "architecture": "sd1", "variant": "ft"}
    top["backbones"]["wide"] = {"source": "./wide", "architecture": "sd1"}
    top["plugins"] = {
        "style": {"kind": "lora", "source": "./plugins/style", "scale": 0.5, "description": "a style"},
        "edges": {"kind": "controlnet", "source": "./plugins/edges"},
        "toy": {"kind": "textual_inversion", "source": "./plugins/toy.safetensors", "token": "<toy>"},
        "tuned-ckpt": {"kind": "checkpoint", "source": "./tuned", "variant": "ft"},
        "wide-style": {"kind": "lora", "source": "./plugins/wide-style", "backbone": "wide"},
        "wide-edges": {"kind": "controlnet", "source": "./plugins/wide-edges", "backbone": "wide"},
    }
    file.write_text(yaml.safe_dump(top, sort_keys=False))
    return file


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _np(pipe, **kw):
    return pipe(ZH, language="zh", num_inference_steps=STEPS, generator=gen(), output_type="np", **kw).images


def test_registry_lists_plugins_and_several_backbones_of_one_architecture(registry):
    reg = load_registry(registry)
    assert set(reg.backbones) == {"tiny", "tuned", "wide"} and reg.backbone("tuned").variant == "ft"
    assert reg.plugin("style").kind == "lora" and reg.plugin("style").backbone == "tiny"
    with pytest.raises(RegistryError, match=r"unknown lora plugin 'stlye'.*did you mean 'style'|unknown lora plugin"):
        reg.plugin("stlye", "lora")


@pytest.mark.parametrize("plugin, match", [
    ({"kind": "hypernetwork", "source": "./x"}, r"plugins\.bad\.kind.*not allowed"),
    ({"kind": "lora", "source": "./x", "backbone": "nope"}, r"plugins\.bad\.backbone.*not a listed backbone"),
    ({"kind": "lora"}, r"plugins\.bad\.source.*required"),
])
def test_registry_refuses_bad_plugin_entries(registry, tmp_path, plugin, match):
    top = yaml.safe_load(registry.read_text())
    top["plugins"] = {"bad": plugin}
    bad = registry.parent / "bad-registry.yaml"
    bad.write_text(yaml.safe_dump(top))
    with pytest.raises(RegistryError, match=match):
        load_registry(bad)


def test_checkpoint_swap_keeps_every_branch(registry):
    pipe = _quiet(PolyBridgePipeline.from_registry(registry, languages=["zh"]))
    branch = pipe.branches["zh"]
    before = _np(pipe)
    tuned = _quiet(PolyBridgePipeline.from_registry(registry, languages=["zh"], backbone="tuned"))
    pipe.swap_backbone(load_backbone(registry, "tuned"))
    assert pipe.branches["zh"] is branch
    swapped = _np(pipe)
    assert not np.array_equal(swapped, before)
    np.testing.assert_array_equal(swapped, _np(tuned))
    # a diffusers folder with a variant, as a path
    again = _quiet(PolyBridgePipeline.from_registry(registry, languages=["zh"]))
    again.swap_backbone(registry.parent / "tuned", variant="ft")
    np.testing.assert_array_equal(_np(again), swapped)


def test_checkpoint_of_another_architecture_is_refused_and_nothing_changes(registry):
    pipe = _quiet(PolyBridgePipeline.from_registry(registry, languages=["zh"]))
    unet = pipe.unet
    with pytest.raises(PluginError, match=r"checkpoint 'wide' is another architecture.*block_out_channels"):
        pipe.swap_backbone(load_backbone(registry, "wide"))
    with pytest.raises(PolyBridgeError, match="branch.*different backbone architecture|another architecture"):
        PolyBridgePipeline.from_registry(registry, languages=["zh"], backbone="wide")
    assert pipe.unet is unet
    with pytest.raises(PluginError, match="cannot be loaded"):
        pipe.swap_backbone(registry.parent / "plugins" / "edges")
    assert pipe.unet is unet


def test_use_plugins_by_name(registry):
    reg = load_registry(registry)
    pipe = _quiet(PolyBridgePipeline.from_registry(reg, languages=["zh"]))
    use_plugins(pipe, reg, loras=["style:0.8"], controlnets=["edges"], tis=["toy"])
    assert pipe.get_list_adapters() == {"unet": ["style"]} and "<toy>_1" in pipe.tokenizer.get_vocab()
    assert pipe.controlnet is not None
    out = pipe(ZH, language="zh", english_prompt="a <toy>", image=Image.new("RGB", (16, 16), (200, 10, 10)),
               num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("kw, match", [
    ({"loras": ["style", "wide-style"]}, r"lora plugin 'wide-style' is for backbone 'wide'.*fit: style$"),
    ({"controlnets": ["nope"]}, r"unknown controlnet plugin 'nope'"),
    ({"tis": ["style"]}, r"unknown textual_inversion plugin 'style'.*toy"),
    ({"controlnets": ["broken"]}, r"ControlNet plugin 'broken': cannot load"),  # fails while loading: rolled back
])
def test_use_plugins_refuses_what_does_not_fit(registry, kw, match):
    top = yaml.safe_load(registry.read_text())
    top["plugins"]["broken"] = {"kind": "controlnet", "source": "./plugins/style"}  # a LoRA folder, not a ControlNet
    file = registry.parent / "broken-registry.yaml"
    file.write_text(yaml.safe_dump(top))
    reg = load_registry(file)
    pipe = _quiet(PolyBridgePipeline.from_registry(reg, languages=["zh"]))
    size = len(pipe.tokenizer)
    with pytest.raises(PolyBridgeError, match=match):
        use_plugins(pipe, reg, **{"loras": ["style"], "tis": ["toy"], **kw})  # all checked before anything loads
    assert pipe.get_list_adapters() == {} and len(pipe.tokenizer) == size and pipe.controlnet is None


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_plugins(capsys, registry, tmp_path):
    hint = tmp_path / "hint.png"
    Image.new("RGB", (16, 16), (0, 200, 0)).save(hint)
    base = ["--registry", str(registry), "generate", ZH, "--lang", "zh", "--steps", "1", "--upscale", "1", "--json"]
    code, out, err = run(capsys, *base, "-o", str(tmp_path / "a.png"), "--lora", "style:0.7", "--controlnet", "edges",
                         "--image", str(hint), "--ti", "toy", "--english-prompt", "a <toy>", "--backbone", "tuned-ckpt")
    assert code == 0, err
    record = json.loads(out)
    assert record["lora"] == ["style:0.7"] and record["backbone"] == "tuned-ckpt"
    code, out, err = run(capsys, *base, "-o", str(tmp_path / "b.png"), "--backbone", "tuned")
    assert code == 0, err
    code, _, err = run(capsys, *base, "-o", str(tmp_path / "c.png"), "--lora", "nope")
    assert code == 2 and "unknown lora plugin 'nope'" in err and "style" in err and "Traceback" not in err
    code, _, err = run(capsys, *base, "-o", str(tmp_path / "d.png"), "--backbone", "huge")
    assert code == 2 and "tuned-ckpt" in err
    code, _, err = run(capsys, *base, "-o", str(tmp_path / "e.png"), "--controlnet", "edges", "--image", str(hint),
                       "--size", "24")
    assert code == 2 and "hint image[0] is 16x16" in err


def test_cli_registry_list_shows_plugins_and_validate_checks_them(capsys, registry):
    code, out, _ = run(capsys, "--registry", str(registry), "registry", "list")
    assert code == 0 and "plugins (6)" in out and "tuned-ckpt" in out and "textual_inversion" in out
    code, out, _ = run(capsys, "--registry", str(registry), "registry", "list", "--json")
    assert [p["name"] for p in json.loads(out)["plugins"]][:2] == ["style", "edges"]
    # `registry validate` runs check_plugin on each (its grammar checks need real grammars, which this registry's
    # stand-ins are not, so the plugin check is called here directly)
    reg = load_registry(registry)
    assert {n: check_plugin(reg, n) for n in reg.plugins} == {n: "ok" for n in reg.plugins}
    top = yaml.safe_load(registry.read_text())
    top["plugins"]["edges"]["source"] = "./plugins/wide-edges"
    top["plugins"]["ckpt"] = {"kind": "checkpoint", "source": "./wide"}
    top["plugins"]["gone"] = {"kind": "lora", "source": "./plugins/gone"}
    bad = registry.parent / "bad-plugins.yaml"
    bad.write_text(yaml.safe_dump(top))
    reg = load_registry(bad)
    with pytest.raises(PluginError, match=r"controlnet plugin 'edges'.*not for backbone 'tiny'.*block_out_channels"):
        check_plugin(reg, "edges")
    with pytest.raises(PluginError, match=r"checkpoint plugin 'ckpt'.*block_out_channels"):
        check_plugin(reg, "ckpt")
    with pytest.raises(PluginError, match=r"lora plugin 'gone'.*does not exist"):
        check_plugin(reg, "gone")


def test_a_copy_of_the_real_registry_keeps_its_plugins_and_validates(capsys, registry_copy):
    """A registry copy (tests, experiments) points at the original's plugins; where its backbone is not built the
    architecture check says "unchecked" instead of failing on the missing backbone config."""
    code = main(["--registry", str(registry_copy), "registry", "validate", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["plugins"]["outline-lora"] == "ok"
    assert out["plugins"]["layout-controlnet"] == "unchecked" and out["plugins"]["navy-checkpoint"] == "unchecked"
