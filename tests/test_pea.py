"""The pea branch (PEA-Diffusion's MLP adapter): its shape, its loss, and how the pipeline runs it."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from polybridge.branches import BDMBranch, Branch, BranchError, PEABranch, get_branch_class
from polybridge.branches.pea import block_outputs
from polybridge.conditioning import Conditioning, compose
from polybridge.pipeline import PolyBridgePipeline
from tiny_components import get_dummy_components, native_encoder, perturb_, tiny_unet, write_registry

STEPS = 2
ZH = "红色的灯笼"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def components():
    return get_dummy_components()


@pytest.fixture(scope="module")
def trained(components):
    return perturb_(PEABranch.from_unet(components["unet"], 48, encoder_name="./encoder"), seed=5, std=0.2).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, *args, **kwargs):
    return pipe(*args, num_inference_steps=STEPS, output_type="latent", **kwargs).images


# --------------------------------------------------------------------------- the adapter


def _student(branch, states):
    """The UNet's inputs in training: the adapter's conditioning composed with the backbone's "" (which it replaces)."""
    return compose([branch.condition(states), Conditioning(context=torch.zeros(states.shape[0], 77, 32),
                                                           optional=True)], states.shape[0]).unet_kwargs()



def test_registered_and_shaped_like_pea():
    assert get_branch_class("pea") is PEABranch and not PEABranch.step_dependent  # runs once per call
    # PEA on SD 1.5 with a 1024-wide encoder: LayerNorm, 1024 -> 2048 -> 2048 -> 768, no bias (~7.9M parameters).
    sd15 = PEABranch(native_hidden_size=1024, context_dim=768, hidden_size=2048, num_layers=3)
    linears = [m for m in sd15.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 2048), (2048, 2048), (2048, 768)]
    assert all(m.bias is None for m in linears)
    assert sum(p.numel() for p in sd15.parameters()) == 7_866_368


def test_from_unet_defaults_and_options(components):
    unet = components["unet"]
    branch = PEABranch.from_unet(unet, 48, encoder_name="./encoder")
    assert branch.config.context_dim == 32 and branch.config.hidden_size == 96  # 2 x max(48, 32)
    assert branch.encoder_hidden_size == 48 and branch.encoder_name == "./encoder"
    states = torch.randn(2, 16, 48)
    assert branch(states).shape == (2, 16, 32)
    assert not branch(states).any(), "the output layer starts at zero: an untrained adapter gives a zero context"
    wide = PEABranch.from_unet(unet, 48, hidden_size=64, num_layers=2, bias=True)
    assert [m.out_features for m in wide.mlp if isinstance(m, torch.nn.Linear)] == [64, 32]
    with pytest.raises(BranchError, match="depth: unknown option for a pea branch; valid: hidden_size, num_layers, bias"):
        PEABranch.from_unet(unet, 48, depth=2)


def test_mask_and_scale(trained):
    states = torch.randn(2, 16, 48)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 8:] = 0
    out = trained(states, attention_mask=mask)
    assert not out[1, 8:].any() and out[1, :8].abs().sum() > 0
    assert torch.allclose(trained(states, conditioning_scale=0.5), 0.5 * trained(states))


def test_save_load_round_trip(tmp_path, components, trained):
    trained.save_pretrained(tmp_path / "pea")
    loaded = Branch.from_pretrained(tmp_path / "pea", backbone_unet=components["unet"])
    assert isinstance(loaded, PEABranch)
    states = torch.randn(1, 16, 48)
    assert torch.equal(loaded(states), trained(states))
    with pytest.raises(BranchError, match="branch_type is 'pea', but BDMBranch loads 'bdm'"):
        BDMBranch.from_pretrained(tmp_path / "pea")
    with pytest.raises(BranchError, match="different backbone architecture"):
        Branch.from_pretrained(tmp_path / "pea", backbone_unet=tiny_unet((32, 96)))


def test_distillation_loss_reads_every_block_and_trains_only_the_adapter(components, trained):
    unet = copy.deepcopy(components["unet"]).requires_grad_(False)  # frozen, as the trainer holds it
    branch = PEABranch.from_unet(unet, 48)
    perturb_(branch, seed=1, std=0.1)
    with block_outputs(unet) as feats:
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    assert len(feats) == len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert not any(b._forward_hooks for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]), "hooks removed"

    noisy, t, target = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 4, 8, 8)
    states = torch.randn(2, 16, 48)
    student = compose([branch.condition(states), Conditioning(context=torch.zeros(2, 77, 32), optional=True)],
                      2).unet_kwargs()
    assert set(student) == {"encoder_hidden_states"}  # the adapter's context replaces the backbone's ""
    assert torch.equal(student["encoder_hidden_states"], branch(states))
    teacher = {"encoder_hidden_states": torch.randn(2, 77, 32)}
    parts = PEABranch.training_loss(unet, noisy, t, target, student, teacher,
                                    {"denoise": 1.0, "distill_output": 1.0, "distill_features": 0.1})
    assert set(parts) == {"loss", "denoise", "distill_output", "distill_features"}
    expected = parts["denoise"] + parts["distill_output"] + 0.1 * parts["distill_features"]
    assert torch.allclose(parts["loss"], expected)
    parts["loss"].backward()
    assert all(p.grad is not None for p in branch.parameters())
    assert all(p.grad is None for p in unet.parameters()), "the frozen UNet gets no gradient"
    # Native-only data: the denoising loss alone.
    branch.zero_grad()
    only = PEABranch.training_loss(unet, noisy, t, target, _student(branch, states), None, {})
    assert set(only) == {"loss", "denoise"}


def test_native_only_examples_take_the_denoising_loss_alone(components):
    """With ``parallel``, the teacher runs on the parallel examples only and each example weighs the same as in a
    batch of its own kind; a batch with none distils nothing."""
    unet = copy.deepcopy(components["unet"]).requires_grad_(False)
    branch = PEABranch.from_unet(unet, 48)
    perturb_(branch, seed=1, std=0.1)
    torch.manual_seed(1)
    noisy, t, target = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 4, 8, 8)
    states, english = torch.randn(3, 16, 48), torch.randn(3, 77, 32)
    weights = {"denoise": 1.0, "distill_output": 1.0, "distill_features": 0.1}

    def loss(rows, parallel=None):
        student = _student(branch, states[rows])
        return PEABranch.training_loss(unet, noisy[rows], t[rows], target[rows], student,
                                       {"encoder_hidden_states": english[rows]}, weights, parallel=parallel)

    mixed = loss([0, 1, 2], torch.tensor([True, False, True]))
    alone = loss([0, 2])  # the two parallel examples as a batch of their own
    for part in ("distill_output", "distill_features"):
        assert torch.allclose(mixed[part], alone[part] * 2 / 3, rtol=1e-5), part
    assert torch.allclose(mixed["denoise"], loss([0, 1, 2])["denoise"])  # every example denoises
    none = loss([1], torch.tensor([False]))
    assert none["distill_output"] == 0 and none["distill_features"] == 0
    assert torch.allclose(none["loss"], none["denoise"])
    assert torch.allclose(loss([0, 2], torch.tensor([True, True]))["loss"], alone["loss"])


# --------------------------------------------------------------------------- in the pipeline


@pytest.fixture(scope="module")
def pipe(components, trained):
    """zh: a trained pea adapter; ko: an untrained one; ja: a trained bdm branch."""
    p = _quiet(PolyBridgePipeline(**components))
    p.add_language("zh", native_encoder(48, seed=1, code="zh"), trained)
    p.add_language("ko", native_encoder(48, seed=3, code="ko"), PEABranch.from_unet(components["unet"], 48), trained=False)
    ja = perturb_(BDMBranch.from_unet(components["unet"], 40, encoder_name="./encoder"), seed=3)
    p.add_language("ja", native_encoder(40, seed=2, code="ja"), ja)
    return p


@pytest.fixture(scope="module")
def sd(components):
    return _quiet(StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False))


def test_untrained_pea_is_the_backbone_with_an_empty_context(pipe, sd):
    out = _latents(pipe, "안녕", language="ko", generator=gen(0))
    zeros = torch.zeros(1, 77, 32)
    expected = sd(prompt_embeds=zeros, negative_prompt_embeds=zeros, num_inference_steps=STEPS, generator=gen(0),
                  output_type="latent").images
    assert torch.allclose(out, expected, atol=1e-5)


def test_trained_pea_replaces_the_context_and_scale_zero_undoes_it(pipe):
    base = _latents(pipe, "안녕", language="ko", generator=gen(0))
    out = _latents(pipe, ZH, language="zh", generator=gen(0))
    assert (out - base).abs().max() > 1e-3
    off = _latents(pipe, ZH, language="zh", generator=gen(0), branch_scale=0.0)
    assert torch.allclose(off, base, atol=1e-5)
    with_english = _latents(pipe, ZH, language="zh", generator=gen(0), english_prompt="a red lantern")
    assert (with_english - out).abs().max() > 1e-4, "a non-empty English prompt joins the adapter's context"


def test_pea_rows_batch_like_one_at_a_time(pipe):
    both = _latents(pipe, [ZH, "蓝色的圆"], language="zh", generator=[gen(0), gen(1)])
    one = _latents(pipe, "蓝色的圆", language="zh", generator=gen(1))
    assert torch.allclose(both[1:], one, atol=1e-5)
    long = "红" * 12  # 36 byte tokens, three chunks to ZH's two: the shorter row is padded and masked
    mixed = _latents(pipe, [long, ZH], language="zh", generator=[gen(0), gen(1)])
    alone = _latents(pipe, ZH, language="zh", generator=gen(1))
    assert torch.allclose(mixed[1:], alone, atol=1e-5)


def test_pea_and_bdm_languages_in_one_pipeline(pipe):
    zh = _latents(pipe, ZH, language="zh", generator=gen(0))
    ja = _latents(pipe, "赤い鳥居", language="ja", generator=gen(0))
    assert zh.shape == ja.shape and (zh - ja).abs().max() > 1e-3


def test_rows_of_context_and_residual_branches_share_one_batch(pipe):
    # Rows of a pea language, a bdm language and English, mixed in one batch (routing will make such
    # batches): each row comes out as it does alone.
    from polybridge.conditioning import Conditioning, compose

    p = pipe
    enc_zh, enc_ja = p.encoders["zh"], p.encoders["ja"]
    embeds = torch.randn(3, 77, 32)
    zh_states, _ = enc_zh.encode_with_mask([ZH])
    ja_states, _ = enc_ja.encode_with_mask(["赤い鳥居"])
    backbone = Conditioning(context=embeds, optional=True)  # every row's English text is ""
    sample = torch.randn(3, 4, 8, 8)
    zh = p.branches["zh"].condition(zh_states, rows=torch.tensor([0]))
    ja = p.branches["ja"].condition(ja_states, sample=sample[1:2], timestep=torch.tensor(10), rows=torch.tensor([1]))
    composed = compose([zh, backbone, ja], 3)
    context, mask = composed.context, composed.context_mask
    n = zh_states.shape[1]
    assert context.shape == (3, max(77, n), 32) and mask is not None
    assert torch.allclose(context[0, :n], p.branches["zh"](zh_states)[0]) and not mask[0, n:].any()
    assert torch.equal(context[1:, :77], embeds[1:]) and mask[1:, :77].all() and not mask[1:, 77:].any()
    down = composed.down
    assert not down[0][0].any() and down[0][1].any(), "only the bdm row gets residuals"


def test_from_registry_loads_a_pea_entry(tmp_path, components, trained):
    root = write_registry(tmp_path, components, {
        "zh": {"encoder": native_encoder(48, seed=1, code="zh"), "branch": trained, "entry": {"branch": {"type": "pea"}}},
    })
    p = _quiet(PolyBridgePipeline.from_registry(root, languages=["zh"]))
    assert isinstance(p.branches["zh"], PEABranch)
    assert p(ZH, language="zh", num_inference_steps=STEPS, generator=gen(0)).images[0].size == (16, 16)
