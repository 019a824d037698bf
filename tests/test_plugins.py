"""Plugins beside branches, the stock diffusers way, on tiny components made in code: LoRA (per row too), Textual
Inversion, ControlNet; StableDiffusionPipeline's call arguments and schedulers."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from plugin_fixtures import make_controlnet, make_lora, make_ti
from tiny_components import get_dummy_components, native_encoder, perturb_, tiny_unet

from polybridge.branches import BDMBranch
from polybridge.errors import PolyBridgeError
from polybridge.pipeline import PolyBridgePipeline
from polybridge.plugins import PluginError
from polybridge.router import Router

pytest.importorskip("peft")

STEPS = 2
ZH = "红色的灯笼"
EN = "a red lantern"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe(seed: int = 0, trained: bool = True, **extra) -> PolyBridgePipeline:
    c = get_dummy_components(seed)
    p = _quiet(PolyBridgePipeline(**c, **extra))
    branch = BDMBranch.from_unet(c["unet"], 48, encoder_name="./encoder")
    p.add_language("zh", native_encoder(48, seed=1), perturb_(branch, seed=3) if trained else branch, trained=trained)
    return p


def _sd(components) -> StableDiffusionPipeline:
    return _quiet(StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False))


def _np(pipe, prompt, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(prompt, generator=gen(), output_type="np", **kw).images


def _branch_state(pipe):
    return {k: v.clone() for k, v in pipe.branches["zh"].state_dict().items()}


# --------------------------------------------------------------------------- LoRA


def test_lora_round_trip_acts_on_the_backbone_only(tmp_path):
    pipe = _pipe()
    before, branch = _np(pipe, ZH, language="zh"), _branch_state(pipe)
    pipe.load_lora_weights(make_lora(pipe.unet, tmp_path / "lora"), adapter_name="style")
    assert pipe.get_list_adapters() == {"unet": ["style"]}
    with_lora = _np(pipe, ZH, language="zh")
    assert not np.array_equal(with_lora, before)
    # the LoRA changes the native prompt's image exactly as it changes the backbone's computation
    manual = _pipe()
    manual.unet.load_lora_adapter(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors",
                                prefix="unet", adapter_name="style")
    np.testing.assert_array_equal(_np(manual, ZH, language="zh"), with_lora)
    # the scale, as in StableDiffusionPipeline: cross_attention_kwargs={"scale": 0} is no LoRA
    np.testing.assert_array_equal(_np(pipe, ZH, language="zh", cross_attention_kwargs={"scale": 0.0}), before)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = _np(pipe, ZH, language="zh")
    assert not np.array_equal(half, with_lora) and not np.array_equal(half, before)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.fuse_lora()
    np.testing.assert_allclose(_np(pipe, ZH, language="zh"), with_lora, atol=1e-4)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    np.testing.assert_allclose(_np(pipe, ZH, language="zh"), before, atol=1e-4)
    assert pipe.get_list_adapters() == {}
    assert all(torch.equal(v, branch[k]) for k, v in pipe.branches["zh"].state_dict().items())


def test_lora_equals_stable_diffusion_with_the_same_lora(tmp_path):
    c = get_dummy_components()
    folder = make_lora(c["unet"], tmp_path / "lora")
    sd = _sd(get_dummy_components())
    sd.load_lora_weights(folder)
    pipe = _quiet(PolyBridgePipeline(**get_dummy_components()))
    pipe.load_lora_weights(folder)
    kw = {"cross_attention_kwargs": {"scale": 0.7}}
    np.testing.assert_array_equal(_np(pipe, EN, language="en", **kw), _np(sd, EN, **kw))


def test_lora_for_another_architecture_is_refused_and_nothing_changes(tmp_path):
    pipe = _pipe()
    pipe.load_lora_weights(make_lora(pipe.unet, tmp_path / "ok"), adapter_name="ok")
    other = make_lora(tiny_unet(block_out_channels=(64, 128)), tmp_path / "other")
    with pytest.raises(PluginError, match=r"LoRA 'wide' is for another architecture.*fingerprint"):
        pipe.load_lora_weights(other, adapter_name="wide")
    assert pipe.get_list_adapters() == {"unet": ["ok"]}
    with pytest.raises(PluginError, match="loaded already"):
        pipe.load_lora_weights(tmp_path / "ok", adapter_name="ok")


def test_per_row_lora_equals_running_the_rows_apart(tmp_path):
    pipe = _pipe()
    pipe.load_lora_weights(make_lora(pipe.unet, tmp_path / "a", seed=1), adapter_name="a")
    pipe.load_lora_weights(make_lora(pipe.unet, tmp_path / "b", seed=2), adapter_name="b")
    prompts, langs = [ZH, ZH + "。", ZH], ["a", None, "b"]
    together = pipe(prompts, language="zh", lora_adapters=langs, num_inference_steps=STEPS,
                    generator=[gen(i) for i in range(3)], output_type="np").images
    for i, (prompt, adapter) in enumerate(zip(prompts, langs)):
        if adapter is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([adapter])
        apart = pipe(prompt, language="zh", num_inference_steps=STEPS, generator=gen(i), output_type="np").images
        np.testing.assert_allclose(together[i], apart[0], atol=1e-5)
    pipe.enable_lora()
    with pytest.raises(PluginError, match="'c' are not loaded; loaded: a, b"):
        pipe([ZH], language="zh", lora_adapters=["c"], num_inference_steps=1)


# --------------------------------------------------------------------------- Textual Inversion


def test_textual_inversion_multi_vector_on_the_backbone_side(tmp_path):
    path = make_ti(tmp_path / "ti" / "toy.safetensors", "<toy>", vectors=3)
    sd = _sd(get_dummy_components())
    sd.load_textual_inversion(path)
    pipe = _pipe(trained=False)
    size = len(pipe.tokenizer)
    pipe.load_textual_inversion(path)
    assert len(pipe.tokenizer) == size + 3 and "<toy>_2" in pipe.tokenizer.get_vocab()
    np.testing.assert_array_equal(_np(pipe, "a <toy>", language="en"), _np(sd, "a <toy>"))
    # beside a zero branch, the English part goes through the same expansion
    np.testing.assert_array_equal(_np(pipe, ZH, language="zh", english_prompt="a <toy>"), _np(sd, "a <toy>"))


def test_textual_inversion_refusals_leave_the_pipeline_as_it_was(tmp_path):
    pipe = _pipe()
    size, weight = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.clone()
    taken = make_ti(tmp_path / "a.safetensors", "a</w>", vectors=1)
    with pytest.raises(PluginError, match=r"Textual Inversion '.*a\.safetensors': Token a</w> already in tokenizer vocabulary"):
        pipe.load_textual_inversion(taken)
    wide = make_ti(tmp_path / "wide.safetensors", "<wide>", width=64)
    with pytest.raises(PluginError, match=r"Textual Inversion '.*wide.*': its embeddings are not 32 wide"):
        pipe.load_textual_inversion(wide)
    assert len(pipe.tokenizer) == size
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, weight)


# --------------------------------------------------------------------------- ControlNet


def _hint(size: int = 16, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _sd_controlnet(controlnet):
    return _quiet(StableDiffusionControlNetPipeline(**get_dummy_components(), controlnet=controlnet,
                                                    safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False))


@pytest.mark.parametrize("kw", [{}, {"controlnet_conditioning_scale": 0.5, "control_guidance_end": 0.5}])
def test_controlnet_beside_a_zero_branch_is_stable_diffusion_controlnet(kw):
    net = make_controlnet(get_dummy_components()["unet"])
    pipe = _pipe(trained=False, controlnet=net)
    ours = _np(pipe, ZH, language="zh", english_prompt=EN, image=_hint(), **kw)
    theirs = _np(_sd_controlnet(net), EN, image=_hint(), **kw)
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, _np(_pipe(trained=False), ZH, language="zh", english_prompt=EN))


def test_multi_controlnet_and_mixed_rows():
    nets = [make_controlnet(get_dummy_components()["unet"], seed=s) for s in (0, 1)]
    pipe = _pipe(trained=False, controlnet=nets)
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    hints = [_hint(seed=0), _hint(seed=1)]
    scale = [0.7, 0.3]
    ours = _np(pipe, ZH, language="zh", english_prompt=EN, image=hints, controlnet_conditioning_scale=scale)
    theirs = _np(_sd_controlnet(MultiControlNetModel(nets)), EN, image=hints, controlnet_conditioning_scale=scale)
    np.testing.assert_array_equal(ours, theirs)
    # a trained branch's residuals add to the ControlNets' on its rows; English rows see the ControlNets alone
    trained = _pipe(controlnet=nets)
    trained.router = Router({"en": ["Latin"], "zh": ["Han"]})
    out = trained([ZH, EN], language=None, image=hints, num_inference_steps=STEPS, output_type="np",
                  generator=[gen(), gen()]).images
    alone = _np(_sd_controlnet(MultiControlNetModel(nets)), EN, image=hints)
    np.testing.assert_allclose(out[1], alone[0], atol=1e-5)
    assert not np.allclose(out[0], alone[0], atol=1e-3)


def test_controlnet_refusals_leave_the_pipeline_as_it_was():
    net = make_controlnet(get_dummy_components()["unet"])
    pipe = _pipe(controlnet=net)
    other = make_controlnet(tiny_unet(block_out_channels=(64, 128)))
    with pytest.raises(PluginError, match=r"ControlNet 'controlnet' does not fit.*block_out_channels.*from_unet"):
        pipe.set_controlnet(other)
    assert pipe.controlnet is net
    with pytest.raises(PluginError, match=r"hint image\[0\] is 24x24.*16x16"):
        pipe(ZH, language="zh", image=_hint(24), height=16, width=16, num_inference_steps=1)
    with pytest.raises(PluginError, match="PIL mode 'F'"):
        pipe(ZH, language="zh", image=_hint().convert("F"), num_inference_steps=1)
    with pytest.raises(PolyBridgeError, match="give its hint image with image="):
        pipe(ZH, language="zh", num_inference_steps=1)
    pipe.set_controlnet(None)
    with pytest.raises(PolyBridgeError, match="no ControlNet"):
        pipe(ZH, language="zh", image=_hint(), num_inference_steps=1)


# --------------------------------------------------------------------------- call arguments, schedulers


@pytest.mark.parametrize("kw", [
    {"guidance_rescale": 0.7},
    {"timesteps": [999, 500, 1], "scheduler": EulerDiscreteScheduler},
    {"sigmas": [14.6, 4.0, 1.0], "scheduler": EulerDiscreteScheduler},
    {"eta": 0.5, "scheduler": DDIMScheduler},
    {"scheduler": DPMSolverMultistepScheduler},
    {"latents": "given"},
    {"cross_attention_kwargs": {"scale": 1.0}},
], ids=lambda kw: "-".join(kw))
def test_call_arguments_mean_what_stable_diffusion_means(kw):
    kw = dict(kw)
    pipe, sd = _quiet(PolyBridgePipeline(**get_dummy_components())), _sd(get_dummy_components())
    scheduler = kw.pop("scheduler", None)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        sd.scheduler = scheduler.from_config(sd.scheduler.config)
    if kw.get("latents") == "given":
        kw["latents"] = torch.randn((1, 4, 8, 8), generator=gen(5))
    steps = {} if "timesteps" in kw or "sigmas" in kw else {"num_inference_steps": STEPS}
    np.testing.assert_array_equal(_np(pipe, EN, language="en", **steps, **kw), _np(sd, EN, **steps, **kw))


def test_clip_skip_reads_an_earlier_layer_through_the_final_layer_norm():
    # diffusers' own clip_skip reaches for text_encoder.text_model, which transformers 5 no longer has: compare with
    # the embeddings computed as StableDiffusionPipeline.encode_prompt documents them
    pipe, sd = _quiet(PolyBridgePipeline(**get_dummy_components())), _sd(get_dummy_components())
    ids = sd.tokenizer([EN, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    embeds = sd.text_encoder.final_layer_norm(hidden)
    expected = _np(sd, None, prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:])
    np.testing.assert_array_equal(_np(pipe, EN, language="en", clip_skip=1), expected)


def test_prompt_embeds_and_callback():
    pipe, sd = _quiet(PolyBridgePipeline(**get_dummy_components())), _sd(get_dummy_components())
    embeds, negative = sd.encode_prompt(EN, "cpu", 1, True, "ugly")
    ours = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
                generator=gen(), output_type="np").images
    np.testing.assert_array_equal(ours, _np(sd, None, prompt_embeds=embeds, negative_prompt_embeds=negative))
    seen = []

    def callback(p, i, t, values):
        seen.append((i, sorted(values), p.num_timesteps, p.guidance_scale))
        return {"latents": values["latents"] * 0.5}

    def sd_callback(p, i, t, values):
        return {"latents": values["latents"] * 0.5}

    inputs = ["latents", "prompt_embeds"]
    ours = _np(pipe, EN, language="en", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    steps = len(pipe.scheduler.timesteps)
    assert seen == [(i, inputs, steps, 7.5) for i in range(steps)]
    np.testing.assert_array_equal(ours, _np(sd, EN, callback_on_step_end=sd_callback))
    with pytest.raises(PolyBridgeError, match="unexpected keyword argument.*'guidance'"):
        pipe(EN, guidance=3)
    with pytest.raises(PolyBridgeError, match="PNDMScheduler.*custom timestep"):
        pipe(EN, language="en", timesteps=[999, 1])


# --------------------------------------------------------------------------- save, load, from_pipe, offload


def test_save_pretrained_then_from_pretrained_draws_the_same_images(tmp_path):
    pipe = _pipe()
    pipe.router = Router({"en": ["Latin"], "zh": ["Han"]})
    path = make_ti(tmp_path / "toy.safetensors", "<toy>", vectors=2)
    pipe.load_textual_inversion(path)
    prompts = [ZH, "a <toy>", f"{ZH}, a <toy>"]

    def draw(p, output_type="latent"):
        return p(prompts, language=None, num_inference_steps=STEPS, output_type=output_type,
                 generator=[gen(i) for i in range(3)])

    before, before_np = draw(pipe), draw(pipe, "np").images
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "registry.yaml").is_file()
    assert (tmp_path / "saved" / "languages" / "zh" / "branch").is_dir()
    again = _quiet(PolyBridgePipeline.from_pretrained(tmp_path / "saved"))
    assert set(again.languages) == {"en", "zh"}
    after = draw(again)
    assert after.languages == before.languages == ["zh", "en", "zh+en"]
    assert torch.equal(after.images, before.images)  # the denoising is bit-identical
    # the decoded batch too, to float rounding (CPU convolutions of a reloaded VAE may sum in another order)
    np.testing.assert_allclose(draw(again, "np").images, before_np, atol=1e-6)
    with pytest.raises(PolyBridgeError, match="not empty|exists"):
        pipe.save_pretrained(tmp_path / "saved")


def test_save_pretrained_of_a_registry_pipeline_keeps_its_entries(tmp_path):
    from tiny_components import write_registry

    c = get_dummy_components()
    branch = perturb_(BDMBranch.from_unet(c["unet"], 48, encoder_name="./encoder"), seed=3)
    registry = write_registry(tmp_path / "reg", c, {"zh": {"encoder": native_encoder(48), "branch": branch}})
    pipe = _quiet(PolyBridgePipeline.from_registry(registry))
    before = _np(pipe, ZH, language=None)
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "languages" / "zh" / "grammar.yaml").is_file()
    np.testing.assert_array_equal(_np(_quiet(PolyBridgePipeline.from_pretrained(tmp_path / "saved")), ZH,
                                      language=None), before)


def test_from_pipe_both_ways_and_from_pretrained_on_a_diffusers_folder(tmp_path):
    sd = _sd(get_dummy_components())
    pipe = _quiet(PolyBridgePipeline.from_pipe(sd))
    assert pipe.unet is sd.unet
    np.testing.assert_array_equal(_np(pipe, EN, language="en"), _np(sd, EN))
    # a polybridge backbone has no safety checker: say so, as when building StableDiffusionPipeline from components
    back = _quiet(StableDiffusionPipeline.from_pipe(_pipe(), safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False))
    np.testing.assert_array_equal(_np(back, EN), _np(sd, EN))
    sd.save_pretrained(tmp_path / "sd")
    loaded = _quiet(PolyBridgePipeline.from_pretrained(tmp_path / "sd"))
    np.testing.assert_array_equal(_np(loaded, EN, language="en"), _np(sd, EN))


def test_model_cpu_offload_hooks_encoders_and_branches():
    pipe = _pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    for module in (pipe.text_encoder, pipe.unet, pipe.vae, pipe.encoders["zh"], pipe.branches["zh"]):
        assert hasattr(module, "_hf_hook"), type(module).__name__
    out = _np(pipe, ZH, language="zh")
    assert out.shape == (1, 16, 16, 3)


def test_sdxl_family_loads_loras_into_both_text_encoders_as_the_sdxl_pipeline_does(tmp_path):
    import copy

    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from tiny_components import get_dummy_sdxl_components

    components = get_dummy_sdxl_components()
    unet, te2 = copy.deepcopy(components["unet"]), copy.deepcopy(components["text_encoder_2"])
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    te2 = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False), te2)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "xl", unet_lora_layers=get_peft_model_state_dict(unet),
                                                text_encoder_2_lora_layers=get_peft_model_state_dict(te2),
                                                safe_serialization=True)
    sdxl = _quiet(StableDiffusionXLPipeline(**copy.deepcopy(components)))
    sdxl.load_lora_weights(tmp_path / "xl", adapter_name="xl")
    pipe = _quiet(PolyBridgePipeline(**copy.deepcopy(components)))
    pipe.load_lora_weights(tmp_path / "xl", adapter_name="xl")
    assert pipe.get_list_adapters() == sdxl.get_list_adapters() == {"unet": ["xl"], "text_encoder_2": ["xl"]}
    # SDXL zeroes the embeddings of an empty negative prompt (force_zeros_for_empty_prompt): give one
    kw = {"num_inference_steps": STEPS, "guidance_scale": 7.5, "output_type": "latent", "negative_prompt": "blurry"}
    for extra in ({}, {"cross_attention_kwargs": {"scale": 0.6}}):
        kw.update(extra)
        expected = sdxl(EN, generator=gen(), **kw).images
        got = pipe(EN, language="en", generator=gen(), **kw).images
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), (extra, (got - expected).abs().max())
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}


def test_sdxl_prompt_embeds_with_pooled_embeds_as_the_sdxl_pipeline():
    import copy

    from diffusers import StableDiffusionXLPipeline
    from tiny_components import get_dummy_sdxl_components

    components = get_dummy_sdxl_components()
    sdxl = _quiet(StableDiffusionXLPipeline(**copy.deepcopy(components)))
    pipe = _quiet(PolyBridgePipeline(**copy.deepcopy(components)))
    embeds, negative, pooled, negative_pooled = sdxl.encode_prompt(EN, device="cpu", negative_prompt="blurry")
    given = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
             "negative_pooled_prompt_embeds": negative_pooled}
    kw = {"num_inference_steps": STEPS, "guidance_scale": 7.5, "output_type": "latent"}
    expected = sdxl(generator=gen(), **given, **kw).images
    assert torch.allclose(pipe(generator=gen(), **given, **kw).images, expected, rtol=0, atol=1e-6)
    with pytest.raises(PolyBridgeError, match="needs pooled_prompt_embeds"):
        pipe(prompt_embeds=embeds, **kw)


def test_single_file_checkpoints_are_safetensors_only(tmp_path):
    with pytest.raises(PolyBridgeError, match="must be .safetensors"):
        PolyBridgePipeline.from_single_file(tmp_path / "model.ckpt")
    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    pipe = _pipe()
    unet = pipe.unet
    with pytest.raises(PluginError, match="must be .safetensors"):
        pipe.swap_backbone(tmp_path / "x.ckpt")
    assert pipe.unet is unet
