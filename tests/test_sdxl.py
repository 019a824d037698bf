"""The ``sdxl`` backbone family end to end on tiny random-weight components built in code: its prompt encoding and
size conditioning equal diffusers' SDXL pipeline, bdm carries the added embedding, pea gives the pooled text, both
train with ``polybridge train``, generate through the pipeline and the CLI, and are refused on an sd backbone (and
the reverse)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from conftest import registry_with_tiny_backbone
from polybridge.backbones import family_of_unet, load_backbone
from polybridge.branches import BDMBranch, Branch, BranchError, PEABranch
from polybridge.cli import main
from polybridge.pipeline import PolyBridgePipeline
from polybridge.router import Router
from tiny_components import get_dummy_components, get_dummy_sdxl_components, native_encoder, perturb_

STEPS = 2
GUIDANCE = 7.5  # SDXL's pipeline defaults to 5.0, polybridge's to 7.5: both are given it
ZH = "左边有一个红色的灯笼"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def components():
    return get_dummy_sdxl_components()


def _pipe(components, branch: Branch | None = None, encoder=None) -> PolyBridgePipeline:
    pipe = PolyBridgePipeline(**copy.deepcopy(components))
    pipe.set_progress_bar_config(disable=True)
    if branch is not None:
        pipe.add_language("zh", encoder or native_encoder(48, seed=1), branch)
    return pipe


def _latents(pipe, *args, **kwargs) -> torch.Tensor:
    return pipe(*args, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent", **kwargs).images


def test_the_family_is_read_from_the_unet(components):
    assert family_of_unet(components["unet"]) == "sdxl"
    assert family_of_unet(get_dummy_components()["unet"]) == "sd"


def test_english_prompts_and_an_untrained_branch_give_the_sdxl_pipeline_images(components):
    """The backbone side is diffusers' own computation: prompt encoding (two encoders, penultimate states, pooled
    projection), size ids, CFG. An untrained bdm branch changes nothing: its image is SDXL's for ""."""
    sdxl = StableDiffusionXLPipeline(**copy.deepcopy(components))
    sdxl.set_progress_bar_config(disable=True)
    pipe = _pipe(components, BDMBranch.from_unet(components["unet"], 48))
    for prompt in ("a red gate on the left", ""):
        expected = sdxl(prompt, negative_prompt="blurry", num_inference_steps=STEPS, generator=gen(0),
                        guidance_scale=GUIDANCE, output_type="latent").images
        got = _latents(pipe, prompt, language="en", negative_prompt="blurry", generator=gen(0))
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), prompt
    expected = sdxl("", negative_prompt="", num_inference_steps=STEPS, generator=gen(0), guidance_scale=GUIDANCE,
                    output_type="latent").images
    assert torch.allclose(_latents(pipe, ZH, language="zh", generator=gen(0)), expected, rtol=0, atol=1e-6)


def test_bdm_carries_the_added_embedding_and_rows_compose(components):
    unet = components["unet"]
    branch = BDMBranch.from_unet(unet, 48)
    assert branch.config.addition_embed_type == "text_time"
    for name, tensor in unet.add_embedding.state_dict().items():
        assert torch.equal(branch.add_embedding.state_dict()[name], tensor), name  # copied, as ControlNet does
    perturb_(branch, seed=3, std=0.05)
    pipe = _pipe(components, branch)
    pipe.router = Router({"en": ["Latin"], "zh": ["Han"]})
    zh = _latents(pipe, ZH, language="zh", generator=gen(0))
    plain = _latents(_pipe(components), "", language="en", generator=gen(0))
    assert (zh - plain).abs().max() > 1e-3, "a trained branch changes the image"
    # A mixed batch (a zh row and an English row): each row as it is alone.
    mixed = _latents(pipe, [ZH, "a red gate"], language=None, generator=[gen(0), gen(1)])
    assert torch.allclose(mixed[:1], zh, rtol=1e-4, atol=1e-5)  # batch-size rounding only
    assert torch.allclose(mixed[1:], _latents(pipe, "a red gate", language="en", generator=gen(1)), rtol=1e-4,
                          atol=1e-5)


def test_pea_gives_the_context_and_the_pooled_text(components):
    unet = components["unet"]
    branch = PEABranch.from_unet(unet, 48)
    assert branch.config.context_dim == 64 and branch.config.pooled_dim == 32
    states = torch.randn(2, 16, 48)
    cond = branch.condition(states)
    assert cond.context.shape == (2, 16, 64) and cond.added["text_embeds"].shape == (2, 32)
    assert not cond.context.any() and not cond.added["text_embeds"].any(), "an untrained adapter gives zeros"
    perturb_(branch, seed=4, std=0.05)
    pipe = _pipe(components, branch)
    a = _latents(pipe, ZH, language="zh", generator=gen(0))
    b = _latents(pipe, "右边有一个蓝色的圆", language="zh", generator=gen(0))
    assert (a - b).abs().max() > 1e-4, "the native prompt reaches the image"


def test_branches_refuse_the_other_family(components, tmp_path):
    sd_unet = get_dummy_components()["unet"]
    for built_on, loaded_on, words in ((components["unet"], sd_unet, "an sdxl backbone on an sd backbone"),
                                       (sd_unet, components["unet"], "an sd backbone on an sdxl backbone")):
        for cls in (BDMBranch, PEABranch):
            folder = tmp_path / f"{cls.branch_type}-{family_of_unet(built_on)}"
            cls.from_unet(built_on, 48).save_pretrained(folder)
            with pytest.raises(BranchError, match=words):
                Branch.from_pretrained(folder, backbone_unet=loaded_on)
            pipe = _pipe(components) if loaded_on is components["unet"] else None
            if pipe is not None:
                with pytest.raises(BranchError, match=words):
                    pipe.add_language("zh", native_encoder(48, seed=1), Branch.from_pretrained(folder))


def test_train_and_generate_from_the_command_line(tmp_path, capsys, components):
    """`polybridge train` (bdm and pea) and `polybridge generate` on an `architecture: sdxl` backbone; the saved
    branches record its fingerprint and load on it, and the sd registry's backbone refuses them."""
    registry = registry_with_tiny_backbone(tmp_path / "repo", components)
    assert "architecture: sdxl" in registry.read_text(encoding="utf-8")
    bb = load_backbone(registry)
    assert bb.family == "sdxl" and bb.text_encoder_2 is not None and bb.tokenizer_2 is not None
    common = ["--steps", "2", "--batch-size", "4", "--num-samples", "8", "--no-progress"]
    for branch_type in ("bdm", "pea"):
        out = tmp_path / f"zh-{branch_type}"
        argv = ["--registry", str(registry), "train", "--lang", "zh", "--branch-type", branch_type, "--out", str(out),
                "--work", str(tmp_path / f"work-{branch_type}"), *common]
        assert main(argv) == 0, capsys.readouterr().err
        branch = Branch.from_pretrained(out, backbone_unet=bb.unet)
        assert branch.branch_type == branch_type and branch.backbone_fingerprint == bb.fingerprint
    # The bdm branch where the entry points: generate from the command line.
    (tmp_path / "zh-bdm").rename(registry.parent / "languages" / "zh" / "branch")
    image = tmp_path / "zh.png"
    assert main(["--registry", str(registry), "generate", ZH, "--lang", "zh", "-n", "1", "--steps", "2",
                 "-o", str(image)]) == 0, capsys.readouterr().err
    assert image.is_file()
    # The same branch on an sd backbone: one clear line, exit 2.
    sd_registry = registry_with_tiny_backbone(tmp_path / "sd-repo")
    (registry.parent / "languages" / "zh" / "branch").rename(sd_registry.parent / "languages" / "zh" / "branch")
    capsys.readouterr()
    assert main(["--registry", str(sd_registry), "generate", ZH, "--lang", "zh", "-n", "1", "--steps", "2",
                 "-o", str(tmp_path / "sd.png")]) == 2
    err = capsys.readouterr().err
    assert "a branch for an sdxl backbone on an sd backbone" in err and not (tmp_path / "sd.png").exists()
