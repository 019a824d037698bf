"""Single-file checkpoints in the original (LDM) layout, as community fine-tunes are published: loaded by diffusers'
``from_single_file`` (offline, ``config=`` a diffusers folder of the architecture), as a whole pipeline, as a swap
that keeps every branch, and as a registry checkpoint plugin; on tiny components made in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from ldm_layout import to_ldm_file
from tiny_components import get_dummy_components, native_encoder, perturb_, save_backbone, tiny_unet, write_registry

from polybridge.branches import BDMBranch
from polybridge.pipeline import PolyBridgePipeline
from polybridge.plugins import PluginError

ZH = "红色的灯笼"
STEPS = 2


def _np(pipe, prompt, **kw):
    return pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                **kw).images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The base backbone as a diffusers folder; a fine-tune of it as an original-layout single file and as a
    diffusers folder; a checkpoint of another architecture as a single file."""
    root = tmp_path_factory.mktemp("single")
    save_backbone(get_dummy_components(), root / "base")
    tuned = get_dummy_components()
    perturb_(tuned["unet"], seed=7, std=0.01)
    to_ldm_file(tuned, root / "tuned.safetensors")
    save_backbone(tuned, root / "tuned")
    wide = get_dummy_components()
    wide["unet"] = tiny_unet(block_out_channels=(64, 128))
    to_ldm_file(wide, root / "wide.safetensors")
    return root


def test_the_layout_is_what_diffusers_reads(files):
    """The helper is right: diffusers' own converter reads the file back to the very weights."""
    sd = StableDiffusionPipeline.from_single_file(str(files / "tuned.safetensors"), config=str(files / "base"),
                                                  local_files_only=True, safety_checker=None,
                                                  requires_safety_checker=False)
    folder = StableDiffusionPipeline.from_pretrained(files / "tuned", safety_checker=None,
                                                     requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(sd, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_from_single_file_gives_the_folder_pipeline(files):
    single = PolyBridgePipeline.from_single_file(files / "tuned.safetensors", config=str(files / "base"),
                                                 local_files_only=True)
    folder = PolyBridgePipeline.from_pretrained(files / "tuned")
    for pipe in (single, folder):
        pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_np(single, "a red lantern", language="en"),
                                  _np(folder, "a red lantern", language="en"))


def test_swap_to_a_single_file_keeps_the_branches(files):
    def pipe_with_branch():
        pipe = PolyBridgePipeline.from_pretrained(files / "base")
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(0)  # the branch's fresh cross-attention weights: the same in both pipelines
        branch = perturb_(BDMBranch.from_unet(pipe.unet, 48, encoder_name="./encoder"), seed=3)
        pipe.add_language("zh", native_encoder(48), branch)
        return pipe

    single, folder = pipe_with_branch(), pipe_with_branch()
    before = _np(single, ZH, language="zh")
    single.swap_backbone(files / "tuned.safetensors", config=files / "base")
    folder.swap_backbone(files / "tuned")
    after = _np(single, ZH, language="zh")
    assert not np.array_equal(after, before)  # the fine-tune draws
    np.testing.assert_array_equal(after, _np(folder, ZH, language="zh"))  # as the same fine-tune from a folder
    # another architecture in one file: refused, the pipeline as it was
    with pytest.raises(PluginError, match=r"checkpoint '.*wide\.safetensors' cannot be loaded as a sd backbone"):
        single.swap_backbone(files / "wide.safetensors", config=files / "base")
    np.testing.assert_array_equal(_np(single, ZH, language="zh"), after)


def test_a_single_file_checkpoint_plugin_from_the_command_line(files, tmp_path, capsys):
    from polybridge.cli import main

    c = get_dummy_components()
    branch = perturb_(BDMBranch.from_unet(c["unet"], 48, encoder_name="./encoder"), seed=3)
    file = write_registry(tmp_path, c, {"zh": {"encoder": native_encoder(48), "branch": branch}})
    top = yaml.safe_load(file.read_text())
    top["plugins"] = {"tuned-file": {"kind": "checkpoint", "source": str(files / "tuned.safetensors")}}
    file.write_text(yaml.safe_dump(top, sort_keys=False))
    base = ["--registry", str(file), "generate", ZH, "--lang", "zh", "--steps", "1", "--upscale", "1", "-n", "1"]
    assert main([*base, "-o", str(tmp_path / "base.png")]) == 0
    assert main([*base, "-o", str(tmp_path / "tuned.png"), "--backbone", "tuned-file"]) == 0, capsys.readouterr().err
    from PIL import Image

    base_image, tuned_image = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("base", "tuned"))
    assert base_image.shape == tuned_image.shape and not np.array_equal(base_image, tuned_image)
