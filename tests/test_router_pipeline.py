"""PolyBridgePipeline with language=None: the router decides, mixed prompts are split into spans, several
branches on one row sum their residuals, and a mixed-language batch equals each prompt alone (tiny components)."""

from __future__ import annotations

import warnings

import pytest
import torch

from polybridge.branches import BDMBranch
from polybridge.pipeline import PolyBridgePipeline
from polybridge.router import Router
from tiny_components import get_dummy_components, native_encoder, perturb_, write_registry

STEPS = 2
SCRIPTS = {"en": ["Latin"], "zh": ["Han"], "ja": ["Hiragana", "Katakana", "Han"], "ru": ["Cyrillic"],
           "ko": ["Hangul", "Han"], "ar": ["Arabic"]}
MIXED = "a red gate, 赤い鳥居"            # en + ja
TWO = "红灯笼 and красный фонарь"         # zh + en + ru: two branches on one row


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latents(pipe, prompt, seed=0, **kwargs):
    kwargs.setdefault("generator", gen(seed))
    return pipe(prompt, num_inference_steps=STEPS, output_type="latent", **kwargs).images


@pytest.fixture(scope="module")
def components():
    return get_dummy_components()


@pytest.fixture(scope="module")
def pipe(components):
    """zh, ja and ru with trained (perturbed) branches; ko untrained with fallback 'backbone'; ar registered
    with the router but not loaded."""
    p = PolyBridgePipeline(**components)
    p.set_progress_bar_config(disable=True)
    for code, width, seed in (("zh", 48, 1), ("ja", 40, 2), ("ru", 44, 3)):
        branch = perturb_(BDMBranch.from_unet(components["unet"], width, encoder_name="./encoder"), seed=seed + 10)
        p.add_language(code, native_encoder(width, seed=seed, code=code), branch)
    p.add_language("ko", trained=False)
    p.router = Router(SCRIPTS)
    return p


def test_routed_single_language_prompts_equal_the_explicit_language(pipe):
    for prompt, negative, code in (("a red gate", "blurry", "en"), ("红色的灯笼", "不要", "zh"), ("赤い鳥居", "暗い", "ja")):
        routed = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, generator=gen(0), output_type="latent")
        assert routed.languages == [code] and routed.plans[0].label == code
        explicit = latents(pipe, prompt, language=code, negative_prompt=negative)
        assert torch.allclose(routed.images, explicit, rtol=0, atol=1e-6), code


def test_mixed_prompt_english_to_backbone_native_to_branch(pipe):
    out = pipe(MIXED, num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    assert out.languages == ["en+ja"]
    assert [(s.language, s.text, s.target) for s in out.plans[0].spans] == [
        ("en", "a red gate", "backbone"), ("ja", "赤い鳥居", "branch")]
    explicit = latents(pipe, "赤い鳥居", language="ja", english_prompt="a red gate")
    assert torch.allclose(out.images, explicit, rtol=0, atol=1e-6)
    # english_prompt is appended to the routed English text.
    assert torch.allclose(latents(pipe, "赤い鳥居", english_prompt="masterpiece"),
                          latents(pipe, "赤い鳥居", language="ja", english_prompt="masterpiece"), rtol=0, atol=1e-6)
    assert torch.allclose(latents(pipe, "a cat", english_prompt="masterpiece"),
                          latents(pipe, "a cat, masterpiece", language="en"), rtol=0, atol=1e-6)


def test_two_native_languages_sum_their_residuals(pipe, monkeypatch):
    """At the first step every call sees the same noisy latents, so the residuals of a zh+ru row must be
    the zh row's plus the ru row's (negative halves included), as MultiControlNet sums ControlNets."""
    seen = []
    original = pipe._step_conditioning

    def spy(base, sample, t, inputs):
        composed = original(base, sample, t, inputs)
        seen.append((sorted(item.code for item in inputs), [d.clone() for d in composed.down], composed.mid.clone()))
        return composed

    monkeypatch.setattr(pipe, "_step_conditioning", spy)
    texts = {}
    for code in ("zh", "ru"):
        encoder = pipe.encoders[code]
        monkeypatch.setattr(encoder, "encode_with_mask",
                            lambda prompts, _e=encoder, _c=code: texts.setdefault(_c, list(prompts)) and
                            type(_e).encode_with_mask(_e, prompts))
    out = pipe(TWO, num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    assert out.languages == ["zh+en+ru"]
    assert texts == {"zh": ["", "红灯笼"], "ru": ["", "красный фонарь"]}  # (negative, positive) for each branch
    both = seen[0]
    seen.clear()
    pipe(TWO.split(" and ")[0], language="zh", english_prompt="and", num_inference_steps=STEPS, generator=gen(0),
         output_type="latent")
    zh = seen[0]
    seen.clear()
    pipe("красный фонарь", language="ru", num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    ru = seen[0]
    assert both[0] == ["ru", "zh"]
    for a, b, c in zip(both[1] + [both[2]], zh[1] + [zh[2]], ru[1] + [ru[2]]):
        assert torch.allclose(a, b + c, rtol=1e-5, atol=1e-6)
    assert (both[2] - zh[2]).abs().max() > 1e-4  # ru does contribute


def test_mixed_language_batch_equals_each_prompt_alone(pipe, monkeypatch):
    prompts = ["a red gate", "红色的灯笼", MIXED, TWO, "", "한복 portrait"]
    negatives = ["blurry", "", "暗い", "", "", ""]
    calls = {"unet": [], "zh": [], "ja": [], "ru": []}
    hooks = [pipe.unet.register_forward_hook(lambda m, a, kw, o: calls["unet"].append(a[0].shape[0]), with_kwargs=True)]
    for code in ("zh", "ja", "ru"):
        hooks.append(pipe.branches[code].register_forward_hook(
            lambda m, a, kw, o, _c=code: calls[_c].append((a[0] if a else kw["sample"]).shape[0]), with_kwargs=True))
    try:
        batched = pipe(prompts, negative_prompt=negatives, num_inference_steps=STEPS,
                       generator=[gen(s) for s in range(len(prompts))], output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    assert batched.languages == ["en", "zh", "en+ja", "zh+en+ru", "en", "ko+en"]
    # One backbone UNet call per step for the whole (CFG-doubled) batch; each branch only on its own rows.
    steps = len(pipe.scheduler.timesteps)  # PNDM: one more than num_inference_steps
    assert calls["unet"] == [2 * len(prompts)] * steps
    assert calls["zh"] == [4] * steps and calls["ja"] == [2] * steps and calls["ru"] == [2] * steps
    single = torch.cat([latents(pipe, p, seed=s, negative_prompt=n) for s, (p, n) in enumerate(zip(prompts, negatives))])
    assert torch.allclose(batched.images, single, rtol=1e-4, atol=1e-5)


def test_negative_prompts_are_routed_too(pipe, monkeypatch):
    backbone_texts, zh_texts = [], []
    original = pipe._encode_backbone
    monkeypatch.setattr(pipe, "_encode_backbone", lambda texts, device, **kw: backbone_texts.append(list(texts))
                        or original(texts, device, **kw))
    encoder = pipe.encoders["zh"]
    monkeypatch.setattr(encoder, "encode_with_mask",
                        lambda prompts: zh_texts.append(list(prompts)) or type(encoder).encode_with_mask(encoder, prompts))
    pipe(["红色的灯笼", "a red gate"], negative_prompt=["blurry", "模糊"], num_inference_steps=1, generator=gen(0),
         output_type="latent")
    # The English negative goes to the backbone; the Chinese one runs zh on the English row ("" as positive).
    assert backbone_texts == [["", "a red gate"], ["blurry", ""]]
    assert zh_texts == [["", "模糊", "红色的灯笼", ""]]


def test_fallback_backbone_language_goes_to_the_backbone(pipe):
    out = pipe("한복 portrait", num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    (ko, en) = out.plans[0].spans
    assert (ko.language, ko.target, ko.trained) == ("ko", "backbone", False)
    assert torch.allclose(out.images, latents(pipe, "한복 portrait", language="en"), rtol=0, atol=1e-6)


def test_languages_the_pipeline_cannot_run_are_errors(pipe, components):
    with pytest.raises(ValueError, match=r"prompt 1 \('قطة'\): 'قطة' is 'ar' \(script.*cannot run \(loaded: en, zh, ja, "
                                         r"ru, ko\); load it with .*from_registry\(languages=\[..., 'ar'\]\)"):
        pipe(["a cat", "قطة"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"negative_prompt 0 .* is 'ar'"):
        pipe("a cat", negative_prompt="قطة", num_inference_steps=1)
    bare = PolyBridgePipeline(**components)
    with pytest.raises(ValueError, match="language=None: routing needs a router"):
        bare("a cat")
    assert pipe.resolve_languages([MIXED, "кот"], None) == ["en+ja", "ru"]
    assert [p.label for p in pipe.route(["a cat", TWO])] == ["en", "zh+en+ru"]


def test_from_registry_routes_on_its_own(tmp_path, components):
    root = tmp_path / "reg"
    zh = native_encoder(48, seed=1, code="zh")
    write_registry(root, components, {
        "zh": {"encoder": zh, "branch": perturb_(BDMBranch.from_unet(components["unet"], 48, encoder_name="./encoder"))},
        "ja": {"encoder": native_encoder(40, seed=2, code="ja"), "entry": {"scripts": ["Hiragana", "Katakana", "Han"]}},
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ja is untrained (zero-branch)
        p = PolyBridgePipeline.from_registry(root)
    p.set_progress_bar_config(disable=True)
    out = p(["红色的灯笼", "赤い鳥居", "a cat", MIXED], num_inference_steps=1, generator=gen(0), output_type="latent")
    assert out.languages == ["zh", "ja", "en", "en+ja"]
    assert [s.trained for s in out.plans[1].spans] == [False] and out.plans[0].spans[0].trained
    # Loading a language afterwards changes the targets.
    assert p.router.routes["ja"] == "branch"
    p.add_language("ja", trained=False)
    assert p.router.routes["ja"] == "backbone"
