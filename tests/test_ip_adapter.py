"""IP-Adapter beside branches, the stock diffusers way (``load_ip_adapter``, ``ip_adapter_image``), on tiny
components made in code: the image prompt acts on the backbone, branches are untouched."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from plugin_fixtures import make_ip_adapter
from tiny_components import get_dummy_components, native_encoder, perturb_, tiny_unet

from polybridge.backbones import architecture_fingerprint
from polybridge.branches import BDMBranch, PEABranch
from polybridge.errors import PolyBridgeError
from polybridge.pipeline import PolyBridgePipeline
from polybridge.plugins import PluginError

STEPS = 2
ZH = "红色的灯笼"
EN = "a red lantern"
WEIGHT = "ip-adapter.safetensors"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _pipe(trained: bool = True, seed: int = 0) -> PolyBridgePipeline:
    c = get_dummy_components(seed)
    pipe = PolyBridgePipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    branch = BDMBranch.from_unet(c["unet"], 48, encoder_name="./encoder")
    pipe.add_language("zh", native_encoder(48, seed=1), perturb_(branch, seed=3) if trained else branch,
                      trained=trained)
    return pipe


def _np(pipe, prompt, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("generator", gen())
    return pipe(prompt, output_type="np", **kw).images


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_ip_adapter(get_dummy_components()["unet"], tmp_path_factory.mktemp("ip") / "ip-adapter")


def test_english_prompt_with_an_image_prompt_equals_stable_diffusion(adapter):
    sd = StableDiffusionPipeline(**get_dummy_components(), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sd.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT)
    pipe = _pipe()
    pipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT)
    for scale in (1.0, 0.4):
        sd.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        np.testing.assert_allclose(_np(pipe, EN, language="en", ip_adapter_image=_image()),
                                   _np(sd, EN, ip_adapter_image=_image()), atol=1e-5)


def test_untrained_branch_with_an_image_prompt_is_the_backbone_with_it(adapter):
    """An untrained branch adds nothing, so a native prompt with an image prompt draws what the backbone draws for
    "" with that image prompt: the adapter reaches the UNet whatever the language."""
    sd = StableDiffusionPipeline(**get_dummy_components(), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sd.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT)
    pipe = _pipe(trained=False)
    pipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT)
    np.testing.assert_allclose(_np(pipe, ZH, language="zh", ip_adapter_image=_image()),
                               _np(sd, "", ip_adapter_image=_image()), atol=1e-5)


def test_image_prompt_composes_with_a_trained_branch_and_leaves_it_alone(adapter, tmp_path):
    pipe = _pipe()
    branch = {k: v.clone() for k, v in pipe.branches["zh"].state_dict().items()}
    fingerprint = architecture_fingerprint(pipe.unet)
    before = _np(pipe, ZH, language="zh")
    pipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT)
    assert pipe.image_encoder is not None
    assert architecture_fingerprint(pipe.unet) == fingerprint  # the backbone's architecture is unchanged
    with_image = _np(pipe, ZH, language="zh", ip_adapter_image=_image())
    other_image = _np(pipe, ZH, language="zh", ip_adapter_image=_image(seed=5))
    assert not np.allclose(with_image, before, atol=1e-3) and not np.allclose(with_image, other_image, atol=1e-3)
    # scale 0 is the adapter off: the branch's image as before
    pipe.set_ip_adapter_scale(0.0)
    np.testing.assert_allclose(_np(pipe, ZH, language="zh", ip_adapter_image=_image()), before, atol=1e-5)
    # the embeddings given instead of the image (as diffusers: CFG's negative half first)
    pipe.set_ip_adapter_scale(1.0)
    embeds = pipe.prepare_ip_adapter_image_embeds(_image(), None, pipe.device, 1, True)
    np.testing.assert_allclose(_np(pipe, ZH, language="zh", ip_adapter_image_embeds=embeds), with_image, atol=1e-5)
    # a branch can still be added with the adapter loaded, and the adapter leaves branches as they were
    pipe.add_language("ja", native_encoder(48, seed=2, code="ja"), BDMBranch.from_unet(pipe.unet, 48))
    assert all(torch.equal(v, branch[k]) for k, v in pipe.branches["zh"].state_dict().items())
    with pytest.raises(PolyBridgeError, match="an IP-Adapter is loaded into the backbone UNet; call "
                                              r"pipe.unload_ip_adapter\(\) first"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.unload_ip_adapter()
    assert pipe.image_encoder is None
    np.testing.assert_allclose(_np(pipe, ZH, language="zh"), before, atol=1e-5)


def test_mixed_languages_with_an_image_prompt_equal_the_rows_apart(adapter):
    pipe = _pipe()
    pea = PEABranch.from_unet(pipe.unet, 48)
    pipe.add_language("ko", native_encoder(48, seed=4, code="ko"), perturb_(pea, seed=6))
    pipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT)
    prompts, languages = [ZH, EN, "빨간 등불"], ["zh", "en", "ko"]
    together = pipe(prompts, language=languages, ip_adapter_image=_image(), num_inference_steps=STEPS,
                    generator=[gen(i) for i in range(3)], output_type="np").images
    for i, (prompt, code) in enumerate(zip(prompts, languages)):
        apart = _np(pipe, prompt, language=code, ip_adapter_image=_image(), generator=gen(i))
        np.testing.assert_allclose(together[i], apart[0], atol=1e-5)


def test_bad_ip_adapters_are_refused_and_nothing_changes(adapter, tmp_path):
    pipe = _pipe()
    before = _np(pipe, ZH, language="zh")
    processors = dict(pipe.unet.attn_processors)
    wide = make_ip_adapter(tiny_unet(block_out_channels=(64, 128)), tmp_path / "wide")
    with pytest.raises(PluginError, match=r"IP-Adapter .*wide is for another architecture: .*to_k_ip is "
                                          r"\(128, 32\), the backbone needs \(64, 32\).*fingerprint"):
        pipe.load_ip_adapter(wide, subfolder="", weight_name=WEIGHT)
    with pytest.raises(PluginError, match=r"no weights file .*nothing\.safetensors"):
        pipe.load_ip_adapter(adapter, subfolder="", weight_name="nothing.safetensors")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / WEIGHT).write_bytes((adapter / WEIGHT).read_bytes())
    with pytest.raises(PluginError, match=r"no image encoder at .*bare/image_encoder"):
        pipe.load_ip_adapter(bare, subfolder="", weight_name=WEIGHT)
    (bare / "image_encoder").mkdir()  # an encoder folder with a config and no weights: diffusers fails half-way
    (bare / "image_encoder" / "config.json").write_text((adapter / "image_encoder" / "config.json").read_text())
    with pytest.raises(PluginError, match=r"IP-Adapter .*bare: cannot be loaded"):
        pipe.load_ip_adapter(bare, subfolder="", weight_name=WEIGHT)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / WEIGHT).write_bytes(b"not safetensors")
    with pytest.raises(PolyBridgeError, match=r"broken/ip-adapter\.safetensors: IP-Adapter weights are not a readable"):
        pipe.load_ip_adapter(tmp_path / "broken", subfolder="", weight_name=WEIGHT)
    assert pipe.image_encoder is None and getattr(pipe.unet.config, "encoder_hid_dim_type", None) is None
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    np.testing.assert_array_equal(_np(pipe, ZH, language="zh"), before)
    # an image prompt with no adapter, and an adapter with no image prompt: one clear error each
    with pytest.raises(PolyBridgeError, match="no IP-Adapter is loaded"):
        _np(pipe, ZH, language="zh", ip_adapter_image=_image())
    pipe.load_ip_adapter(adapter, subfolder="", weight_name=WEIGHT)
    with pytest.raises(PolyBridgeError, match=r"an IP-Adapter is loaded: give ip_adapter_image="):
        _np(pipe, ZH, language="zh")


# --------------------------------------------------------------------------- as registry data, from the CLI


def test_generate_with_an_ip_adapter_plugin(tmp_path, capsys):
    import yaml
    from tiny_components import write_registry

    from polybridge.cli import main
    from polybridge.plugins.use import use_plugins
    from polybridge.registry import load_registry

    c = get_dummy_components()
    branch = perturb_(BDMBranch.from_unet(c["unet"], 48, encoder_name="./encoder"), seed=3)
    file = write_registry(tmp_path, c, {"zh": {"encoder": native_encoder(48), "branch": branch}})
    make_ip_adapter(c["unet"], tmp_path / "plugins" / "look")
    top = yaml.safe_load(file.read_text())
    top["plugins"] = {"look": {"kind": "ip_adapter", "source": "./plugins/look", "scale": 0.6}}
    file.write_text(yaml.safe_dump(top, sort_keys=False))
    _image(3).save(tmp_path / "look.png")

    def run(*argv):
        code = main(["--registry", str(file), "generate", ZH, "--lang", "zh", "--steps", "1", "--upscale", "1",
                     "-n", "1", *argv])
        out = capsys.readouterr()
        return code, out.err

    code, err = run("-o", str(tmp_path / "plain.png"))
    assert code == 0, err
    code, err = run("-o", str(tmp_path / "look.out.png"), "--ip-adapter", "look", "--ip-image",
                    str(tmp_path / "look.png"))
    assert code == 0, err
    plain = np.asarray(PIL.Image.open(tmp_path / "plain.png"))
    look = np.asarray(PIL.Image.open(tmp_path / "look.out.png"))
    assert plain.shape == look.shape and not np.array_equal(plain, look)
    # the plugin at its registry scale, as the library does it
    pipe = PolyBridgePipeline.from_registry(load_registry(file), languages=["zh"])
    use_plugins(pipe, load_registry(file), ip_adapter="look")
    scales = {p.scale[0] for p in pipe.unet.attn_processors.values() if hasattr(p, "scale")}
    assert scales == {0.6}
    # the server leaves it out (a request has no image prompt) and says why
    from polybridge.plugins.use import load_served_plugins

    served = PolyBridgePipeline.from_registry(load_registry(file), languages=["zh"])
    skipped = load_served_plugins(served, load_registry(file))
    assert skipped["look"].startswith("an ip_adapter plugin: the server applies lora and textual_inversion")
    # `registry validate` checks the folder's weights and image encoder
    from polybridge.plugins.use import check_plugin

    assert check_plugin(load_registry(file), "look") == "ok"
    (tmp_path / "plugins" / "look" / "image_encoder" / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(PluginError, match=r"ip_adapter plugin 'look' .*key plugins.look.source.*no image encoder"):
        check_plugin(load_registry(file), "look")
    (tmp_path / "config.json").rename(tmp_path / "plugins" / "look" / "image_encoder" / "config.json")
    # user mistakes: one line each, exit 2, nothing written
    for argv, message in ((["--ip-image", str(tmp_path / "look.png")], "--ip-image needs --ip-adapter"),
                          (["--ip-adapter", "look"], "--ip-adapter NAME needs --ip-image"),
                          (["--ip-adapter", "look", "--ip-image", str(tmp_path / "plain.txt")], "--ip-image"),
                          (["--ip-adapter", "nope", "--ip-image", str(tmp_path / "look.png")],
                           "unknown ip_adapter plugin 'nope'")):
        (tmp_path / "plain.txt").write_text("not an image")
        code, err = run("-o", str(tmp_path / "bad.png"), *argv)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad.png").exists()


def test_sdxl_english_prompt_with_an_image_prompt_equals_stable_diffusion_xl(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from tiny_components import get_dummy_sdxl_components

    folder = make_ip_adapter(get_dummy_sdxl_components()["unet"], tmp_path / "ip-xl")
    xl = StableDiffusionXLPipeline(**get_dummy_sdxl_components())
    xl.set_progress_bar_config(disable=True)
    xl.load_ip_adapter(folder, subfolder="", weight_name=WEIGHT)
    pipe = PolyBridgePipeline(**get_dummy_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(folder, subfolder="", weight_name=WEIGHT)
    # a negative prompt and the guidance given: SDXL's own zeroes an empty negative and defaults to 5
    kw = {"negative_prompt": "blurry", "ip_adapter_image": _image(), "num_inference_steps": STEPS,
          "guidance_scale": 5.0, "output_type": "latent"}
    ours = pipe(EN, language="en", generator=gen(), **kw).images
    theirs = xl(EN, generator=gen(), **kw).images
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)
    pipe.set_ip_adapter_scale(0.0)
    assert not torch.allclose(pipe(EN, language="en", generator=gen(), **kw).images, ours, atol=1e-3)


def test_non_finite_ip_adapter_weights_are_refused(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(adapter / WEIGHT))
    state["image_proj.proj.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    save_file(state, str(bad / WEIGHT))
    pipe = _pipe()
    with pytest.raises(PolyBridgeError, match=r"nan/ip-adapter\.safetensors: IP-Adapter weights.*(NaN|non-finite)"):
        pipe.load_ip_adapter(bad, subfolder="", weight_name=WEIGHT)
    assert pipe.image_encoder is None
