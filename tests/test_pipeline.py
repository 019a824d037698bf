"""PolyBridgePipeline, native encoders and backbone loading, on tiny random components (offline, 2 steps, 8x8 latents)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from polybridge.backbones import load_backbone
from polybridge.branches import BDMBranch
from polybridge.encoders import load_encoder
from polybridge.pipeline import PolyBridgePipeline
from polybridge.registry import RegistryError, load_registry
from polybridge.router import Router
from tiny_components import get_dummy_components, native_encoder, perturb_, write_registry

STEPS = 2
ZH = "红色的灯笼挂在古老的宝塔上"
JA = "赤い鳥居"




def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def components():
    return get_dummy_components()


@pytest.fixture(scope="module")
def pipe(components):
    """zh with an untrained branch, ja with a trained (perturbed) one, built in memory."""
    p = _quiet(PolyBridgePipeline(**components))
    zh = native_encoder(48, seed=1, code="zh")
    p.add_language("zh", zh, BDMBranch.from_unet(components["unet"], 48, encoder_name="./encoder"), trained=False)
    ja = native_encoder(40, seed=2, code="ja")
    p.add_language("ja", ja, perturb_(BDMBranch.from_unet(components["unet"], 40, encoder_name="./encoder"), seed=3))
    return p


@pytest.fixture(scope="module")
def sd(components):
    return _quiet(StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False))


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory, components):
    """A registry on disk: zh trained, ja untrained (zero-branch), ko fallback backbone, ru fallback error."""
    root = tmp_path_factory.mktemp("registry")
    zh_encoder = native_encoder(48, seed=1, code="zh")
    zh_branch = perturb_(BDMBranch.from_unet(components["unet"], 48, encoder_name="./encoder"), seed=4)
    write_registry(root, components, {
        "zh": {"encoder": zh_encoder, "branch": zh_branch, "entry": {"branch": {"scale": 0.5}}},
        "ja": {"encoder": native_encoder(40, seed=2, code="ja"), "entry": {"scripts": ["Hiragana", "Han"]}},
        "ko": {"entry": {"scripts": ["Hangul"], "fallback": "backbone"}},
        "ru": {"entry": {"scripts": ["Cyrillic"], "fallback": "error"}},
    })
    return root


# --------------------------------------------------------------------------- the zero-branch identity


def test_untrained_branch_gives_exactly_the_backbone_image_for_empty_prompt(pipe, sd):
    for output_type in ("latent", "np"):
        ours = pipe(ZH, language="zh", negative_prompt="不要", num_inference_steps=STEPS, generator=gen(0),
                    output_type=output_type).images
        plain = sd("", negative_prompt="", num_inference_steps=STEPS, generator=gen(0), output_type=output_type).images
        assert ours.shape == plain.shape
        assert np.allclose(np.asarray(ours), np.asarray(plain), rtol=0, atol=1e-6)


def test_english_prompt_goes_to_the_backbone(pipe, sd):
    ours = pipe("a red lantern", language="en", negative_prompt="blurry", num_inference_steps=STEPS,
                generator=gen(1), output_type="latent")
    plain = sd("a red lantern", negative_prompt="blurry", num_inference_steps=STEPS, generator=gen(1),
               output_type="latent").images
    assert ours.languages == ["en"]
    assert torch.allclose(ours.images, plain, rtol=0, atol=1e-6)


def test_trained_branch_changes_the_image_and_scale_zero_undoes_it(pipe, sd):
    plain = sd("", negative_prompt="", num_inference_steps=STEPS, generator=gen(0), output_type="latent").images
    ours = pipe(JA, language="ja", num_inference_steps=STEPS, generator=gen(0), output_type="latent").images
    assert (ours - plain).abs().max() > 1e-3
    off = pipe(JA, language="ja", num_inference_steps=STEPS, generator=gen(0), output_type="latent",
               branch_scale=0.0).images
    assert torch.allclose(off, plain, rtol=0, atol=1e-6)
    # The English side still mixes in: a non-empty english_prompt changes the result.
    mixed = pipe(JA, language="ja", english_prompt="a gate", num_inference_steps=STEPS, generator=gen(0),
                 output_type="latent").images
    assert (mixed - ours).abs().max() > 1e-4


def test_batch_equals_one_at_a_time(pipe):
    prompts = [JA, "赤い鳥居と青い空", ""]
    batched = pipe(prompts, language="ja", negative_prompt=["", "暗い", ""], num_inference_steps=STEPS,
                   generator=[gen(s) for s in (0, 1, 2)], output_type="latent").images
    single = torch.cat([pipe(p, language="ja", negative_prompt=n, num_inference_steps=STEPS, generator=gen(s),
                             output_type="latent").images
                        for p, n, s in zip(prompts, ["", "暗い", ""], (0, 1, 2))])
    assert batched.shape == (3, 4, 8, 8)
    assert torch.allclose(batched, single, rtol=1e-4, atol=1e-5)


def test_mixed_language_rows_share_one_batch(pipe):
    # The router gives each row its own language (tests/test_router_pipeline.py has mixed prompts too).
    rows = ["ja", "en", "zh", "ja"]
    prompts = [JA, "a red gate", ZH, "青い鳥居"]
    pipe.router = Router({"en": ["Latin"], "zh": ["Han"], "ja": ["Hiragana", "Katakana", "Han"]})
    try:
        batched = pipe(prompts, num_inference_steps=STEPS, generator=[gen(s) for s in range(4)], output_type="latent")
    finally:
        pipe.router = None
    assert batched.languages == rows
    single = torch.cat([pipe(p, language=c, num_inference_steps=STEPS, generator=gen(s), output_type="latent").images
                        for s, (p, c) in enumerate(zip(prompts, rows))])
    assert torch.allclose(batched.images, single, rtol=1e-4, atol=1e-5)


def test_long_prompts_are_chunked_and_batch_independent(pipe):
    long = "赤い鳥居" * 6  # 72 byte tokens: 6 chunks of 14 at max_length 16, more than 5 -> warned and cut
    with pytest.warns(UserWarning, match=r"ja prompt is 72 tokens.*at most 5 chunks of 14 tokens"):
        batched = pipe([long, JA], language="ja", num_inference_steps=STEPS, generator=[gen(0), gen(1)],
                       output_type="latent").images
    with pytest.warns(UserWarning, match="ja prompt is 72 tokens"):
        first = pipe(long, language="ja", num_inference_steps=STEPS, generator=gen(0), output_type="latent").images
    second = pipe(JA, language="ja", num_inference_steps=STEPS, generator=gen(1), output_type="latent").images
    assert torch.allclose(batched, torch.cat([first, second]), rtol=1e-4, atol=1e-5)


def test_num_images_per_prompt(pipe):
    out = pipe([JA, ""], language="ja", num_images_per_prompt=2, num_inference_steps=STEPS,
               generator=[gen(s) for s in range(4)], output_type="np")
    assert out.images.shape == (4, 16, 16, 3)
    assert out.languages == ["ja"] * 4
    with pytest.raises(ValueError, match="2 generators for 4 images"):
        pipe([JA, ""], language="ja", num_images_per_prompt=2, num_inference_steps=STEPS, generator=[gen(), gen()])


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="prompt: the list is empty"):
        pipe([], language="ja")
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        pipe(3, language="ja")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_inference_steps must be an integer of at least 1"):
        pipe(JA, language="ja", num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be a number of at least 0"):
        pipe(JA, language="ja", guidance_scale=-1.0)
    with pytest.raises(RegistryError, match=r"unknown language code 'xx'; valid: en, zh, ja"):
        pipe(JA, language="xx")
    with pytest.raises(ValueError, match="language=None: routing needs a router.*without a registry"):
        pipe(JA)
    with pytest.raises(ValueError, match="negative_prompt: 1 entries for 2 prompts"):
        pipe([JA, JA], language="ja", negative_prompt=["x"])
    with pytest.raises(ValueError, match="english_prompt is for prompts that run a branch"):
        pipe("a cat", language="en", english_prompt="a dog")
    with pytest.raises(ValueError, match="output_type 'jpg' is not supported"):
        pipe(JA, language="ja", output_type="jpg")
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(JA, language="ja", height=15)


def test_to_moves_languages(components):
    p = PolyBridgePipeline(**get_dummy_components(seed=5))
    p.add_language("zh", native_encoder(48), BDMBranch.from_unet(p.unet, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.to(torch.float64)
    assert p.encoders["zh"].dtype == torch.float64 and p.branches["zh"].dtype == torch.float64
    assert p.dtype == torch.float64
    assert set(p.components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "encoders", "branches",
                                 "text_encoder_2", "tokenizer_2", "controlnet", "image_encoder", "feature_extractor"}
    assert p.text_encoder_2 is None and p.tokenizer_2 is None  # SDXL's second text side, absent on an sd backbone
    assert p.image_encoder is None and p.feature_extractor is None  # an IP-Adapter's, until one is loaded


def test_add_language_checks_the_branch(components):
    p = PolyBridgePipeline(**components)
    with pytest.raises(ValueError, match="reads 40-wide token states, but encoder './encoder' gives 48"):
        p.add_language("zh", native_encoder(48), BDMBranch.from_unet(components["unet"], 40))
    from tiny_components import tiny_unet

    with pytest.raises(ValueError, match="different backbone architecture"):
        p.add_language("zh", native_encoder(48), BDMBranch.from_unet(tiny_unet((32, 96)), 48))
    with pytest.raises(ValueError, match="backbone's language"):
        p.add_language("en", native_encoder(48), BDMBranch.from_unet(components["unet"], 48))


# --------------------------------------------------------------------------- native encoders


def test_encoder_tokenizes_like_its_tokenizer_and_chunks_long_prompts():
    enc = native_encoder(48, max_length=16, max_chunks=3)
    for text in ("", "a red cat", JA):
        assert enc.chunk_ids(text) == [enc.tokenizer(text)["input_ids"]]
    assert enc.encode([""]).shape == (1, 16, 48)
    long = "a" * 30  # 30 tokens: 3 chunks of 14, 14, 2
    chunks = enc.chunk_ids(long)
    assert [len(c) for c in chunks] == [16, 16, 4] and all(c[0] == chunks[0][0] for c in chunks)
    states, mask = enc.encode_with_mask([long, "a"])
    assert states.shape == (2, 48, 48)
    assert mask is not None and mask[0].all() and mask[1, :16].all() and not mask[1, 16:].any()
    # Each chunk is encoded on its own: the first chunk's states are those of its ids alone.
    alone = enc.model(input_ids=torch.tensor([chunks[0]]), attention_mask=torch.ones(1, 16, dtype=torch.long))
    assert torch.allclose(states[0, :16], alone.last_hidden_state[0], atol=1e-6)
    assert enc.encode_with_mask(["a", "b"])[1] is None
    with pytest.warns(UserWarning, match=r"zh prompt is 50 tokens.*at most 3 chunks of 14 tokens.*last 8 tokens"):
        assert enc.encode(["a" * 50]).shape == (1, 48, 48)


def test_encoder_hidden_layer():
    enc = native_encoder(48)
    last = enc.encode(["a red cat"])
    enc.hidden_layer = -2
    penultimate = enc.encode(["a red cat"])
    assert last.shape == penultimate.shape and not torch.allclose(last, penultimate)
    enc.hidden_layer = 7
    with pytest.raises(ValueError, match="hidden_layer 7 is out of range.*3 hidden states"):
        enc.encode(["a"])


# --------------------------------------------------------------------------- loading from a registry on disk


def test_from_registry_two_native_languages(registry_root, components):
    with pytest.warns(UserWarning, match=r"language 'ja' \(JA\) has no trained branch.*UNTRAINED.*polybridge train --lang ja"):
        p = _quiet(PolyBridgePipeline.from_registry(registry_root, languages=["zh", "ja"]))
    assert set(p.languages) == {"en", "zh", "ja"}
    assert p.languages["zh"].scale == 0.5 and p.languages["zh"].trained and not p.languages["ja"].trained
    assert p.unet.training is False and not any(q.requires_grad for q in p.unet.parameters())
    out = p([ZH, "灯笼"], language="zh", num_inference_steps=STEPS, generator=[gen(0), gen(1)])
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    assert out.languages == ["zh", "zh"]
    out = p(JA, language="ja", num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    # ja is untrained: its image is the backbone's for "" (the loaded backbone has the same weights).
    plain = _quiet(StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False))
    expected = plain("", negative_prompt="", num_inference_steps=STEPS, generator=gen(0), output_type="latent").images
    assert torch.allclose(out.images, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"'ko' is registered but not loaded in this pipeline \(loaded: en, zh, ja\)"):
        p("안녕", language="ko")
    with pytest.raises(RegistryError, match=r"unknown language code 'xx'.*valid: en, zh, ja, ko, ru"):
        p("x", language="xx")
    # The saved (trained) zh branch is the one loaded, not a zero branch.
    assert p.branches["zh"].controlnet_mid_block.weight.abs().sum() > 0


def test_from_registry_fallbacks(registry_root):
    reg = load_registry(registry_root)
    backbone = load_backbone(reg)
    with pytest.warns(UserWarning, match="'ko'.*fallback 'backbone'"):
        p = _quiet(PolyBridgePipeline.from_registry(reg, languages=["ko"], backbone=backbone))
    assert p.languages["ko"].route == "backbone" and "ko" not in p.branches
    with pytest.raises(FileNotFoundError, match=r"language 'ru' \(RU\) has no trained branch.*fallback is 'error'"):
        PolyBridgePipeline.from_registry(reg, languages=["ru"], backbone=backbone)
    with pytest.raises(RegistryError, match="unknown language code 'xx'"):
        PolyBridgePipeline.from_registry(reg, languages=["xx"], backbone=backbone)


def test_missing_local_weights_are_clear_errors(registry_root, tmp_path):
    reg = load_registry(registry_root)
    with pytest.raises(FileNotFoundError, match=r"language 'ko' \(KO\): encoder folder .*ko/encoder does not exist"
                                                 r".*scripts/build_encoders.py --langs ko"):
        load_encoder(reg.language("ko"))
    # Weights that do not fill the model are refused, not topped up with random values.
    broken = tmp_path / "broken"
    shutil.copytree(registry_root, broken, symlinks=True)
    config_file = broken / "languages" / "zh" / "encoder" / "config.json"
    config_file.write_text(config_file.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(ValueError, match=r"language 'zh': encoder weights in .* do not fit CLIPTextModel "
                                         r"\(missing: encoder.layers.2.*randomly initialised"):
        load_encoder(load_registry(broken).language("zh"))
    (tmp_path / "registry.yaml").write_text((registry_root / "registry.yaml").read_text().replace(
        "./model", "./no-model"))
    (tmp_path / "languages").symlink_to(registry_root / "languages")
    with pytest.raises(FileNotFoundError, match=r"backbone 'tiny': folder .*no-model does not exist.*build_default.py"):
        load_backbone(load_registry(tmp_path))
