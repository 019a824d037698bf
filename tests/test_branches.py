"""Branch types: the registry of types, the bdm branch built from a UNet, saving and loading it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polybridge.backbones import architecture_config, architecture_fingerprint
from polybridge.branches import (
    BDMBranch,
    Branch,
    BranchError,
    branch_types,
    get_branch_class,
    register_branch,
)
from polybridge.branches import base as branch_base
from tiny_components import perturb_, tiny_unet

NATIVE = 48  # the native encoder's width; the backbone's cross-attention is 32 wide




@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def trained(unet):
    """A branch with every weight (zero convs included) moved off its initial value."""
    return perturb_(BDMBranch.from_unet(unet, NATIVE, encoder_name="./encoder"), seed=1).eval()


def _inputs(batch: int = 2, tokens: int = 16, width: int = NATIVE):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor(10),
            torch.randn(batch, tokens, width, generator=gen))


# --------------------------------------------------------------------------- the branch-type registry


def test_branch_types_registry():
    assert "bdm" in branch_types()
    assert get_branch_class("bdm") is BDMBranch
    with pytest.raises(ValueError, match=r"unknown branch type 'bdn' \(did you mean 'bdm'\?\); valid: bdm"):
        get_branch_class("bdn")


def test_every_listed_branch_type_resolves_to_its_class():
    for name in branch_types():
        assert get_branch_class(name).branch_type == name


def test_register_branch_rejects_conflicts():
    class Other(BDMBranch):
        branch_type = "bdm"

    with pytest.raises(ValueError, match="already registered to BDMBranch"):
        register_branch("bdm", Other)
    with pytest.raises(ValueError, match="must agree"):
        register_branch("pea", BDMBranch)
    with pytest.raises(TypeError, match="not a subclass"):
        register_branch("x", torch.nn.Linear)  # type: ignore[arg-type]
    register_branch("bdm", BDMBranch)  # registering the same class again is harmless


# --------------------------------------------------------------------------- building from the UNet


def test_from_unet_copies_weights_except_native_kv(unet):
    branch = BDMBranch.from_unet(unet, NATIVE, encoder_name="./encoder")
    assert branch.fresh_keys, "the cross-attention K/V read 48-wide states and cannot be copied from a 32-wide UNet"
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in branch.fresh_keys), branch.fresh_keys
    unet_state = unet.state_dict()
    for name, tensor in branch.state_dict().items():
        if name.startswith("controlnet_"):
            assert not tensor.any(), f"{name} must start at zero"
        elif name not in branch.fresh_keys:
            assert torch.equal(tensor, unet_state[name]), name
    same_width = BDMBranch.from_unet(unet, 32)
    assert same_width.fresh_keys == []
    assert branch.config.cross_attention_dim == NATIVE
    assert branch.config.encoder == {"name": "./encoder", "hidden_size": NATIVE}
    assert branch.backbone_fingerprint == architecture_fingerprint(unet)


def test_from_unet_rejects_unsupported_unets(unet):
    with pytest.raises(ValueError, match="native_hidden_size"):
        BDMBranch.from_unet(unet, 0)
    with pytest.raises(BranchError, match="unknown option for a bdm branch"):
        BDMBranch.from_unet(unet, NATIVE, hint_channels=3)


def test_untrained_branch_changes_nothing(unet):
    branch = BDMBranch.from_unet(unet, NATIVE)
    sample, t, states = _inputs()
    down, mid = branch(sample, t, states)
    assert all(not r.any() for r in down) and not mid.any()
    context = torch.randn(2, 7, 32)
    with torch.no_grad():
        plain = unet(sample, t, context).sample
        with_branch = unet(sample, t, context, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
    assert torch.equal(plain, with_branch)


def test_residuals_match_what_the_unet_expects(unet, trained):
    sample, t, states = _inputs()
    expected: list[tuple[int, ...]] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: expected.append(tuple(o.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: expected.extend(tuple(r.shape) for r in o[1])))
    mid_shape: list[tuple[int, ...]] = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid_shape.append(tuple(o.shape))))
    with torch.no_grad():
        unet(sample, t, torch.randn(2, 7, 32))
        down, mid = trained(sample, t, states)
    for h in hooks:
        h.remove()
    # The UNet zips its residuals with the additional ones: a count mismatch would silently drop some.
    assert [tuple(r.shape) for r in down] == expected
    assert tuple(mid.shape) == mid_shape[0]
    with torch.no_grad():
        out = unet(sample, t, torch.randn(2, 7, 32), down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
    assert out.shape == sample.shape


def test_conditioning_scale_and_mask(trained):
    sample, t, states = _inputs()
    with torch.no_grad():
        down, mid = trained(sample, t, states)
        down2, mid2 = trained(sample, t, states, conditioning_scale=2.0)
        down0, mid0 = trained(sample, t, states, conditioning_scale=0.0)
        assert any(r.abs().sum() > 0 for r in down) and mid.abs().sum() > 0
        assert all(torch.allclose(2 * a, b) for a, b in zip(down, down2)) and torch.allclose(2 * mid, mid2)
        assert all(not r.any() for r in down0) and not mid0.any()
        # Masked-out tokens are ignored: extra masked tokens leave the residuals (numerically) unchanged.
        padded = torch.cat([states, torch.randn(2, 16, NATIVE)], dim=1)
        mask = torch.cat([torch.ones(2, 16), torch.zeros(2, 16)], dim=1)
        down_m, mid_m = trained(sample, t, padded, attention_mask=mask)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(down, down_m)) and torch.allclose(mid, mid_m, atol=1e-5)


def test_gradient_checkpointing(unet):
    branch = perturb_(BDMBranch.from_unet(unet, NATIVE), seed=2).train()
    sample, t, states = _inputs()

    def loss(out):
        return sum(r.square().mean() for r in out.down_block_res_samples) + out.mid_block_res_sample.square().mean()

    plain = branch(sample, t, states)
    loss(plain).backward()
    grads = [p.grad.clone() for p in branch.parameters()]
    branch.zero_grad()
    branch.enable_gradient_checkpointing()
    assert branch.is_gradient_checkpointing
    ckpt = branch(sample, t, states)
    loss(ckpt).backward()
    assert torch.allclose(plain.mid_block_res_sample, ckpt.mid_block_res_sample)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, branch.parameters()))


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_architecture_not_weights():
    a, b = tiny_unet(seed=0), tiny_unet(seed=1)
    assert not torch.equal(a.conv_in.weight, b.conv_in.weight)
    assert architecture_fingerprint(a) == architecture_fingerprint(b) == architecture_fingerprint(dict(a.config))
    assert len(architecture_fingerprint(a)) == 16
    wider = tiny_unet(block_out_channels=(32, 96))
    assert architecture_fingerprint(wider) != architecture_fingerprint(a)
    assert architecture_config(wider)["block_out_channels"] == [32, 96]


# --------------------------------------------------------------------------- saving and loading


def test_save_load_round_trip(tmp_path, unet, trained):
    folder = trained.save_pretrained(tmp_path / "branch")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["branch_type"] == "bdm"
    assert config["backbone_fingerprint"] == architecture_fingerprint(unet)
    assert config["encoder"] == {"name": "./encoder", "hidden_size": NATIVE}
    import polybridge

    assert config["polybridge_version"] == polybridge.__version__
    assert config["cross_attention_dim"] == NATIVE

    loaded = Branch.from_pretrained(folder, backbone_unet=unet)  # the saved branch_type picks the class
    assert type(loaded) is BDMBranch
    assert BDMBranch.from_pretrained(folder).backbone_fingerprint == trained.backbone_fingerprint
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    sample, t, states = _inputs()
    with torch.no_grad():
        (d1, m1), (d2, m2) = trained(sample, t, states), loaded(sample, t, states)
    assert all(torch.equal(a, b) for a, b in zip(d1, d2)) and torch.equal(m1, m2)
    as_json = lambda c: json.loads(json.dumps(dict(c)))  # noqa: E731 - tuples and lists compare equal
    assert as_json(loaded.config) == as_json(trained.config)


def test_fingerprint_mismatch_is_a_clear_error(tmp_path, trained):
    folder = trained.save_pretrained(tmp_path / "branch")
    other = tiny_unet(block_out_channels=(32, 96))
    with pytest.raises(BranchError) as info:
        BDMBranch.from_pretrained(folder, backbone_unet=other)
    message = str(info.value)
    assert str(folder) in message
    assert architecture_fingerprint(other) in message and trained.backbone_fingerprint in message
    assert "block_out_channels: branch [32, 64] vs backbone [32, 96]" in message


def test_corrupt_or_missing_weights_are_clear_errors(tmp_path, trained):
    folder = trained.save_pretrained(tmp_path / "branch")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00\x01 this is not safetensors")
    with pytest.raises(BranchError, match=f"{weights}: not a readable safetensors file"):
        Branch.from_pretrained(folder)
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"branch weights not found \(pytorch_model.bin present, but pickle"):
        Branch.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="branch folder not found"):
        Branch.from_pretrained(tmp_path / "nowhere")


def test_config_problems_are_clear_errors(tmp_path, trained):
    folder = trained.save_pretrained(tmp_path / "branch")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "backbone_fingerprint"}))
    with pytest.raises(BranchError, match="missing recorded key.*backbone_fingerprint"):
        Branch.from_pretrained(folder)
    config_file.write_text(json.dumps({**config, "branch_type": "pea"}))
    with pytest.raises(BranchError, match="branch_type is 'pea', but BDMBranch loads 'bdm'"):
        BDMBranch.from_pretrained(folder)
    config_file.write_text(json.dumps({**config, "block_out_channels": [32, 96]}))
    with pytest.raises(BranchError, match="weights do not fit the config.*wrong shape"):
        Branch.from_pretrained(folder)
    config_file.write_text("{not json")
    with pytest.raises(BranchError, match=f"{config_file}: not readable JSON"):
        Branch.from_pretrained(folder)


def test_stored_in_half_precision_loads_as_float32(tmp_path, trained):
    full = trained.save_pretrained(tmp_path / "full")
    half = trained.save_pretrained(tmp_path / "half", torch_dtype=torch.float16)
    stored = load_file(str(half / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    size = lambda f: (f / "diffusion_pytorch_model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    loaded = Branch.from_pretrained(half)
    for name, a in trained.state_dict().items():
        b = loaded.state_dict()[name]
        assert b.dtype == torch.float32 and torch.equal(b, a.half().float()), name
    assert next(Branch.from_pretrained(half, torch_dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_save_is_atomic(tmp_path, monkeypatch, unet, trained):
    folder = tmp_path / "branch"
    BDMBranch.from_unet(unet, NATIVE).save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(branch_base, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        trained.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branch"], "no temporary folder may remain"

    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        trained.save_pretrained(folder, overwrite=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    trained.save_pretrained(folder)  # and a save that succeeds replaces it
    assert {p.name: p.read_bytes() for p in folder.iterdir()} != before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Branch.from_pretrained(folder, backbone_unet=unet)
