"""The toy plugins' builder (``scripts/build_toy_plugins.py``): every kind trains a few steps on the embedded
backbone and is written in its ecosystem's format, which the stock loaders read; a resumed build equals an
uninterrupted one."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from polybridge.embedded.toy_plugins import TOY_PLUGINS, ToyTrainConfig, build_toy_plugin, toy_plugin
from polybridge.errors import PolyBridgeError
from polybridge.pipeline import PolyBridgePipeline
from polybridge.plugins.use import load_controlnet

pytest.importorskip("peft")

SMALL = dict(steps=2, batch=4, scenes=16, checkpoint_every=1, warmup=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    for plugin in TOY_PLUGINS:
        build_toy_plugin(plugin, root / plugin.name, root / "work" / plugin.name, ToyTrainConfig(**SMALL),
                         log=lambda _m: None)
    return root


def test_every_kind_is_written_in_its_format_and_loads_with_the_stock_loaders(built):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = PolyBridgePipeline.from_registry(languages=[])
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(built / "outline-lora"), adapter_name="outline")
    assert pipe.get_list_adapters()["unet"] == ["outline"]
    pipe.load_textual_inversion(str(built / "kite-ti" / "learned_embeds.safetensors"), token="<kite>")
    assert "<kite>" in pipe.tokenizer.get_vocab()
    net = load_controlnet(built / "layout-controlnet", "layout", pipe.unet)
    assert all(p.dtype == torch.float16 for p in load_file(str(built / "layout-controlnet" /
                                                                "diffusion_pytorch_model.safetensors")).values())
    assert net.config.down_block_types == ["DownBlock2D", "DownBlock2D"]
    pipe.unload_lora_weights()
    pipe.swap_backbone(str(built / "navy-checkpoint"))
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base[k].to(v.dtype))]
    assert changed  # the fine-tune moved the UNet's weights (two steps at the full learning rate)


def test_a_resumed_build_equals_an_uninterrupted_one(tmp_path):
    plugin = toy_plugin("kite-ti")
    cfg = ToyTrainConfig(**SMALL)
    build_toy_plugin(plugin, tmp_path / "whole", tmp_path / "w1", cfg, log=lambda _m: None)
    cut = build_toy_plugin(plugin, tmp_path / "cut", tmp_path / "w2", cfg, log=lambda _m: None, stop_at=1)
    assert cut["steps"] == 1 and not (tmp_path / "cut").exists()
    # the same command again: it resumes at step 1
    info = build_toy_plugin(plugin, tmp_path / "resumed", tmp_path / "w2", cfg, log=lambda _m: None)
    assert info["resumed_at"] == 1
    whole = load_file(str(tmp_path / "whole" / "learned_embeds.safetensors"))["<kite>"]
    resumed = load_file(str(tmp_path / "resumed" / "learned_embeds.safetensors"))["<kite>"]
    assert torch.equal(whole, resumed)


def test_unknown_toy_plugin_names_the_valid_ones():
    with pytest.raises(PolyBridgeError, match="outline-lora, layout-controlnet, kite-ti, navy-checkpoint"):
        toy_plugin("watercolour")
