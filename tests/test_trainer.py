"""The common trainer on a tiny random backbone: entry-driven, frozen backbone, resume, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import registry_with_tiny_backbone
from polybridge.branches import BDMBranch, Branch, BranchError, PEABranch
from polybridge.cli import main
from polybridge.registry import RegistryError, load_registry
from polybridge.training.branch_data import DataError, examples_from_dataset, load_examples
from polybridge.training.trainer import (
    DataOrder,
    TrainingError,
    TrainOptions,
    lr_lambda,
    sample_draws,
    train_language,
)

#: Tiny runs: 32 examples, batches of 4.
QUICK = dict(num_samples=32, batch_size=4, max_steps=4, checkpoint_every=2, warmup_steps=1, progress=False)


@pytest.fixture(scope="module")
def registry_file(tmp_path_factory) -> Path:
    return registry_with_tiny_backbone(tmp_path_factory.mktemp("train") / "repo")


@pytest.fixture
def reg(registry_file):
    return load_registry(registry_file)


def _opts(tmp_path: Path, name: str = "run", **kwargs) -> TrainOptions:
    return TrainOptions(**{**QUICK, "work_dir": tmp_path / f"work-{name}", "out_dir": tmp_path / f"out-{name}",
                           **kwargs})


def _quiet(_msg: str) -> None:
    pass


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


# --------------------------------------------------------------------------- training from the entry


def test_bdm_branch_from_the_entry_with_a_frozen_backbone(reg, tmp_path):
    seen = {}

    def check(step, loss, run):
        frozen = [run.frozen.unet, run.frozen.vae, run.frozen.text_encoder, run.frozen.encoder.model]
        for module in frozen:
            assert not module.training
            for p in module.parameters():
                assert not p.requires_grad and p.grad is None, "a gradient reached a frozen module"
        seen[step] = {k: v.clone() for k, v in run.frozen.unet.state_dict().items()}
        assert all(p.requires_grad for p in run.branch.parameters())

    opts = _opts(tmp_path)
    info = train_language(reg, "zh", opts, log=_quiet, callback=check)
    assert sorted(seen) == [1, 2, 3, 4] and all(torch.equal(seen[1][k], seen[4][k]) for k in seen[1])
    branch = Branch.from_pretrained(opts.out_dir)
    assert isinstance(branch, BDMBranch) and branch.encoder_name == "./encoder"
    assert branch.encoder_hidden_size == 96  # the committed zh encoder
    assert branch.controlnet_mid_block.weight.abs().sum() > 0, "the zero convs moved"
    # Everything not given as a flag comes from the entry (languages/zh/language.yaml).
    training = info["settings"]["training"]
    assert training["max_steps"] == 4 and training["batch_size"] == 4
    assert training["caption_dropout"] == reg.language("zh").branch.training.caption_dropout
    assert training["learning_rate"] == reg.language("zh").branch.training.learning_rate
    assert info["settings"]["data"]["dataset"] == "synthetic" and info["settings"]["data"]["english_column"] is None
    assert info["steps"] == 4 and len(info["losses"]) == 4 and info["samples_per_s"] > 0
    assert json.loads((opts.work_dir / "train_info.json").read_text())["final_loss"] == info["final_loss"]
    assert sorted(p.name for p in opts.out_dir.iterdir()) == [".polybridge-output", "config.json",
                                                              "diffusion_pytorch_model.safetensors"]


def test_pea_adapter_distils_from_the_english_caption(reg, tmp_path):
    opts = _opts(tmp_path, branch_type="pea", branch_options={"hidden_size": 40})
    info = train_language(reg, "ja", opts, log=_quiet)
    assert info["branch_type"] == "pea" and info["settings"]["data"]["english_column"] == "caption_en"
    assert info["settings"]["branch_options"] == {"hidden_size": 40}
    branch = Branch.from_pretrained(tmp_path / "out-run")
    assert isinstance(branch, PEABranch) and branch.mlp[-1].weight.abs().sum() > 0
    assert branch.config.hidden_size == 40 and branch.mlp[0].weight.shape == (40, 96)
    cache = load_file(str(tmp_path / "work-run" / "cache" / "cache.safetensors"))
    n = info["settings"]["data"]["n"]
    assert cache["parallel"].shape == (n,) and int((cache["parallel"] == 0).sum()) == info["settings"]["data"]["native_only"]


def test_stop_and_resume_end_where_an_uninterrupted_run_ends(reg, tmp_path):
    full = _opts(tmp_path, "full", max_steps=6, ema=True)
    train_language(reg, "zh", full, log=_quiet)
    part = _opts(tmp_path, "part", max_steps=6, ema=True)
    first = train_language(reg, "zh", replace(part, stop_at=3), log=_quiet)
    assert first["stopped_early"] and first["steps"] == 3
    messages = []
    second = train_language(reg, "zh", replace(part, resume=True), log=messages.append)
    assert second["resumed_from"] == 3 and any("reading cached encodings" in m for m in messages)
    a, b = _weights(full.out_dir), _weights(part.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x[0] for x in second["losses"]] == list(range(1, 7))
    full_info = json.loads((full.work_dir / "train_info.json").read_text())
    assert second["losses"] == full_info["losses"]
    # With ema: the written branch is the EMA, kept in the checkpoint beside the live weights.
    ema = load_file(str(part.work_dir / "checkpoint" / "ema.safetensors"))
    live = load_file(str(part.work_dir / "checkpoint" / "branch.safetensors"))
    assert all(torch.equal(ema[k], b[k]) for k in b) and any(not torch.equal(live[k], b[k]) for k in b)


def test_languages_share_the_latents_of_the_same_scenes(reg, tmp_path):
    """With objects: all every language's scenes are the same, so their latents are computed once."""
    first = _opts(tmp_path / "shared", "zh", max_steps=1, objects="all")
    train_language(reg, "zh", first, log=_quiet)
    messages = []
    second = _opts(tmp_path / "shared", "ja", max_steps=1, save_dtype="float16", objects="all")
    train_language(reg, "ja", second, log=messages.append)
    assert any("latents read from the shared cache" in m for m in messages)
    alone = _opts(tmp_path / "alone", "ja", max_steps=1, save_dtype="float16", objects="all")
    messages = []
    train_language(reg, "ja", alone, log=messages.append)
    assert not any("shared cache" in m for m in messages)
    zh, ja, ja_alone = (load_file(str(o.work_dir / "cache" / "cache.safetensors")) for o in (first, second, alone))
    assert torch.equal(zh["latents"], ja["latents"]) and torch.equal(ja["latents"], ja_alone["latents"])
    assert torch.equal(ja["states"], ja_alone["states"]) and not torch.equal(zh["states"][:, :4], ja["states"][:, :4])
    assert _weights(second.out_dir).keys() == _weights(alone.out_dir).keys()
    a, b = _weights(second.out_dir), _weights(alone.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "a run on shared latents trains exactly as one that encodes"
    assert {v.dtype for v in a.values()} == {torch.float16}  # --save-dtype float16
    with pytest.raises(TrainingError, match="save_dtype 'half': valid: float32, float16, bfloat16"):
        train_language(reg, "ja", replace(alone, save_dtype="half"), log=_quiet)


def _named_shapes(reg, code: str, captions: list[str]) -> list[set[str]]:
    """The shapes each native caption names, read back by the benchmark's dictionary (an unnamed "object" is
    left out: another language's concept, or a plural like "two objects")."""
    from polybridge.bench.translate import build_dictionary
    from polybridge.synthetic.captions import load_grammars

    grammars = load_grammars(reg)
    dictionary = build_dictionary(grammars[code], grammars["en"])
    return [{key for attribute, key, _ in dictionary.lookup(c) if attribute == "shape" and key != "object"}
            for c in captions]


def test_own_objects_draw_the_generic_shapes_and_the_languages_own_concepts(reg, tmp_path):
    everything = load_examples(reg, reg.language("zh"), image_size=16, seed=0, num_samples=300, objects="all")
    own = load_examples(reg, reg.language("zh"), image_size=16, seed=0, num_samples=300, objects="own")
    named_all, named_own = (_named_shapes(reg, "zh", e.captions) for e in (everything, own))
    # every drawable object: most scenes show only another language's concepts, which zh leaves unnamed
    assert sum(not shapes for shapes in named_all) > 0.3 * len(named_all)
    # own: every scene shows something zh names, and together they are the generic shapes and zh's concepts
    assert all(named_own)
    assert set().union(*named_own) == {"circle", "square", "triangle", "star", "cross", "lantern", "pagoda"}
    assert own.description["concepts"] == ["lantern", "pagoda"] and everything.description["concepts"] is None
    # each language's own scenes, so each its own latents: nothing is read from the shared cache
    first = _opts(tmp_path, "zh", max_steps=1, objects="own")
    train_language(reg, "zh", first, log=_quiet)
    messages = []
    train_language(reg, "ja", _opts(tmp_path, "ja", max_steps=1, objects="own"), log=messages.append)
    assert not any("shared cache" in m for m in messages)
    with pytest.raises(DataError, match="objects='mine' is not valid; valid: all, own"):
        load_examples(reg, reg.language("zh"), image_size=16, seed=0, num_samples=4, objects="mine")


def test_a_scene_english_cannot_name_has_no_parallel_caption(reg):
    """English calls zh's lantern and pagoda "object", which is not a translation: those scenes are native-only."""
    own = load_examples(reg, reg.language("zh"), image_size=16, seed=0, num_samples=300, objects="own",
                        need_english=True)
    concepts = [bool(shapes & {"lantern", "pagoda"}) for shapes in _named_shapes(reg, "zh", own.captions)]
    assert [e is None for e in own.english] == concepts
    assert own.description["native_only"] == sum(concepts) and 0.2 * 300 < sum(concepts) < 0.8 * 300
    english = [e for e in own.english if e is not None]
    assert english and all(_named_shapes(reg, "en", english))  # each names a shape, not just "object"
    # a dataset's empty or missing English cell is the same: no parallel caption
    examples = examples_from_dataset(_dataset(n=3, en=["a red circle", "", None]), caption_column="text",
                                     english_column="en", image_size=16)
    assert examples.english == ["a red circle", None, None] and examples.description["native_only"] == 2


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(reg, tmp_path):
    def poison(step, loss, run):
        if step == 2:
            with torch.no_grad():
                for p in run.branch.parameters():
                    p.fill_(float("nan"))

    opts = _opts(tmp_path, max_steps=6)
    with pytest.raises(TrainingError, match=r"the loss is nan at step 2 .*last good checkpoint is .*checkpoint "
                                            r"\(step 2\).*untouched"):
        train_language(reg, "zh", opts, log=_quiet, callback=poison)
    state = json.loads((opts.work_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(opts.work_dir / "checkpoint" / "branch.safetensors")).values())
    assert not opts.out_dir.exists()


def test_gradient_checkpointing_computes_the_same_step(reg, tmp_path):
    losses = {}
    for flag in (False, True):
        train_language(reg, "zh", _opts(tmp_path, str(flag), max_steps=2, gradient_checkpointing=flag), log=_quiet,
                       callback=lambda step, loss, run, flag=flag: losses.setdefault(flag, []).append(loss))
    assert losses[False] == pytest.approx(losses[True], rel=1e-5)


def test_min_snr_weighting_reweights_the_denoising_loss(reg, tmp_path):
    losses = {}
    for name, gamma in (("plain", None), ("huge", 1e9), ("min-snr", 1.0)):
        train_language(reg, "zh", _opts(tmp_path, name, max_steps=1, snr_gamma=gamma), log=_quiet,
                       callback=lambda step, loss, run, name=name: losses.setdefault(name, []).append(loss))
    assert losses["huge"] == pytest.approx(losses["plain"], rel=1e-6), "a gamma no SNR reaches changes nothing"
    assert losses["min-snr"][0] < 0.99 * losses["plain"][0], "gamma 1 weights every step with SNR above 1 down"
    with pytest.raises(TrainingError, match="snr_gamma must be positive"):
        train_language(reg, "zh", _opts(tmp_path, "bad", snr_gamma=0.0), log=_quiet)


def test_weighted_mse_is_the_plain_mse_with_unit_weights():
    from polybridge.branches.base import weighted_mse

    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    plain = torch.nn.functional.mse_loss(pred, target)
    assert torch.allclose(weighted_mse(pred, target), plain)
    assert torch.allclose(weighted_mse(pred, target, torch.ones(3)), plain)
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted_mse(pred, target, torch.tensor([1.0, 0.0, 2.0])), (per[0] + 2 * per[2]) / 3)


def test_mixed_precision_where_the_device_allows(reg, tmp_path):
    from polybridge.training.trainer import resolve_mixed_precision

    assert resolve_mixed_precision("no") == "no"
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("fp16", log=_quiet) == "no"  # fp16 needs a GPU
    info = train_language(reg, "zh", _opts(tmp_path, max_steps=2, mixed_precision="bf16"), log=_quiet)
    assert info["mixed_precision"] in ("bf16", "no")  # bf16 where the CPU has it, else fp32
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "out-run").values()), "the branch trains in fp32"


# --------------------------------------------------------------------------- data order


def test_data_order_is_a_function_of_seed_and_step_not_of_the_process_count():
    order = DataOrder(10, seed=0)
    epoch0 = order.indices(0, 5, range(5)) + order.indices(1, 5, range(5))
    assert sorted(epoch0) == list(range(10)), "one epoch visits every example once"
    rank0, rank1 = order.indices(3, 4, range(0, 2)), order.indices(3, 4, range(2, 4))
    assert rank0 + rank1 == order.indices(3, 4, range(4)) and not set(rank0) & set(rank1)
    t, noise, drops = sample_draws(0, 7, range(4), 1000, 0.5, (4, 2, 2))
    t2, noise2, drops2 = sample_draws(0, 7, range(2, 4), 1000, 0.5, (4, 2, 2))
    assert torch.equal(t[2:], t2) and torch.equal(noise[2:], noise2) and drops[2:] == drops2


def test_lr_schedule():
    from polybridge.registry import TrainingSpec

    spec = TrainingSpec(max_steps=100, warmup_steps=10)
    f = lr_lambda(spec)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.09)))
    assert f(100) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda(replace(spec, lr_schedule="constant"))(50) == 1.0


# --------------------------------------------------------------------------- refusals


def test_refusals_leave_everything_as_it_was(reg, registry_file, tmp_path):
    opts = _opts(tmp_path)
    opts.out_dir.mkdir()
    (opts.out_dir / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match="already holds a branch; pass --overwrite"):
        train_language(reg, "zh", opts, log=_quiet)
    assert (opts.out_dir / "config.json").read_text() == "{}"
    with pytest.raises(RegistryError, match="'en' is the backbone's language"):
        train_language(reg, "en", opts, log=_quiet)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        train_language(reg, "zh", replace(opts, out_dir=blocker / "branch"), log=_quiet)
    with pytest.raises(TrainingError, match="batch_size 5 must be a multiple"):
        train_language(reg, "zh", replace(opts, batch_size=5, gradient_accumulation_steps=2, overwrite=True),
                       log=_quiet)


def test_resume_refuses_other_settings_and_a_checkpoint_needs_resume(reg, tmp_path):
    opts = _opts(tmp_path, max_steps=4)
    train_language(reg, "zh", replace(opts, stop_at=2), log=_quiet)
    with pytest.raises(TrainingError, match=r"holds a checkpoint at step 2: pass --resume"):
        train_language(reg, "zh", replace(opts, out_dir=tmp_path / "other"), log=_quiet)
    with pytest.raises(TrainingError, match=r"other settings \(.*training.learning_rate"):
        train_language(reg, "zh", replace(opts, resume=True, learning_rate=0.5), log=_quiet)


def test_processes_that_accelerate_does_not_see_are_refused(reg, tmp_path, monkeypatch):
    # The known pitfall: `accelerate launch --multi_gpu` on CPUs without ACCELERATE_USE_CPU starts N processes
    # that each believe they are alone, and each would train on all the data.
    from accelerate import PartialState

    PartialState()  # this (single) process's state, as the launched ones would have it
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match=r"2 processes were launched but accelerate sees 1.*ACCELERATE_USE_CPU=true"):
        train_language(reg, "zh", _opts(tmp_path), log=_quiet)
    assert not (tmp_path / "out-run").exists()


def test_init_from_a_branch_of_another_backbone_is_refused(reg, tmp_path):
    from tiny_components import tiny_unet

    other = BDMBranch.from_unet(tiny_unet((32, 96)), 96, encoder_name="./encoder")
    other.save_pretrained(tmp_path / "other-backbone")
    with pytest.raises(BranchError, match="built for a different backbone architecture"):
        train_language(reg, "zh", _opts(tmp_path, init_from=tmp_path / "other-backbone"), log=_quiet)


# --------------------------------------------------------------------------- datasets


def _dataset(n: int = 8, size: int = 16, mode: str = "RGB", **columns):
    import datasets
    from PIL import Image

    images = [Image.new(mode, (size, size), color=0) for _ in range(n)]
    data = {"image": images, "text": [f"红色的圆 {i}" for i in range(n)], **columns}
    if isinstance(columns.get("image"), list) and isinstance(columns["image"][0], bytes):
        return datasets.Dataset.from_dict(data, features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string")}))
    return datasets.Dataset.from_dict(data)


@pytest.mark.parametrize("kwargs, dataset, words", [
    (dict(caption_column="caption"), dict(), r"data.caption_column: no column 'caption'; its columns are image, text"),
    (dict(caption_column="text", english_column="en"), dict(), "data.english_column: no column 'en'"),
    (dict(caption_column="text", image_column="img"), dict(), "data.image_column: no column 'img'"),
    (dict(caption_column="text"), dict(n=0), "the dataset is empty"),
    (dict(caption_column="text"), dict(image=[b"not an image"] * 8), r"row 0: column 'image': the image does not "
                                                                    "decode"),
])
def test_bad_datasets_are_clear_errors(kwargs, dataset, words):
    import datasets

    ds = _dataset(**dataset) if dataset.get("n", 1) else datasets.Dataset.from_dict({"image": [], "text": []})
    with pytest.raises(DataError, match=words):
        examples_from_dataset(ds, image_size=16, name="ds", **kwargs)


def test_trains_on_a_saved_dataset_and_the_cli_names_a_missing_column(registry_file, tmp_path, capsys):
    import yaml

    ds = _dataset(n=8)
    ds.save_to_disk(str(registry_file.parent / "languages" / "ko" / "data"))
    entry_file = registry_file.parent / "languages" / "ko" / "language.yaml"
    original = entry_file.read_text(encoding="utf-8")
    entry = yaml.safe_load(original)
    try:
        entry["data"] = {"dataset": "./data", "caption_column": "text", "image_column": "image"}
        entry_file.write_text(yaml.safe_dump(entry, allow_unicode=True), encoding="utf-8")
        out = tmp_path / "ko-branch"
        argv = ["--registry", str(registry_file), "train", "--lang", "ko", "--steps", "2", "--batch-size", "4",
                "--out", str(out), "--work", str(tmp_path / "work"), "--no-progress", "--json"]
        assert main(argv) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["examples"] == 8 and Path(record["out"]) == out and (out / "config.json").is_file()
        entry["data"]["caption_column"] = "caption_ko"
        entry_file.write_text(yaml.safe_dump(entry, allow_unicode=True), encoding="utf-8")
        assert main(argv[:-1] + ["--overwrite"]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("polybridge: error:")]
        assert len(errors) == 1 and "data.caption_column: no column 'caption_ko'; its columns are image, text" in errors[0]
    finally:
        entry_file.write_text(original, encoding="utf-8")


def test_an_image_folder_with_captions_in_metadata(reg, tmp_path):
    import dataclasses

    from PIL import Image

    from polybridge.registry import DataSpec
    from polybridge.training.branch_data import open_dataset

    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "caption_ko": f"빨간 원 {i}"}, ensure_ascii=False))
    (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    entry = dataclasses.replace(reg.language("ko"), folder=tmp_path,
                                data=DataSpec(dataset="./imgs", caption_column="caption_ko"))
    examples = examples_from_dataset(open_dataset(entry), caption_column="caption_ko", image_size=16)
    assert examples.n == 3 and sorted(examples.captions)[0] == "빨간 원 0"
    assert examples.read_images([0, 2]).shape == (2, 3, 16, 16)
    missing = dataclasses.replace(entry, data=DataSpec(dataset="./nothing", caption_column="caption_ko"))
    with pytest.raises(DataError, match=r"dataset .*nothing does not exist .*key data.dataset"):
        open_dataset(missing)


def test_cli_train_all_and_bad_flags(registry_file, tmp_path, capsys):
    assert main(["--registry", str(registry_file), "train", "--all", "--out", str(tmp_path)]) == 2
    assert "--out and --init-from name one branch" in capsys.readouterr().err
    assert main(["--registry", str(registry_file), "train", "--lang", "en"]) == 2
    assert "backbone's language" in capsys.readouterr().err
    assert main(["--registry", str(registry_file), "train", "--lang", "zh", "--branch-type", "lora",
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown branch type 'lora'" in capsys.readouterr().err
    pea = ["--registry", str(registry_file), "train", "--lang", "zh", "--branch-type", "pea", "--out", str(tmp_path / "p")]
    assert main([*pea, "--branch-option", "width=8"]) == 2
    assert "--branch-option width: unknown option for a pea branch; valid: hidden_size, num_layers, bias" \
        in capsys.readouterr().err
    assert main([*pea, "--branch-option", "hidden_size"]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err
    assert main([*pea, "--branch-option", "hidden_size=8", "--init-from", str(tmp_path / "saved")]) == 2
    assert "--branch-option with --init-from" in capsys.readouterr().err
    # A bad value is caught when the branch is built, right after the models load and before any data is encoded.
    assert main([*pea, "--branch-option", "hidden_size=abc", "--work", str(tmp_path / "w")]) == 2
    assert "pea branch options {'hidden_size': 'abc'}: invalid literal" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_tensorboard_tracker(reg, tmp_path):
    pytest.importorskip("tensorboard")
    opts = _opts(tmp_path, max_steps=2, report_to="tensorboard")
    train_language(reg, "zh", opts, log=_quiet)
    assert list((opts.work_dir / "logs").rglob("events.out.tfevents.*"))


def test_constant_context_kv_cache_is_exact_and_removed():
    """The frozen UNet's cross-attention K/V of the constant "" context, computed once: same prediction and same
    gradients as the plain UNet; other contexts go through unchanged; the patch is gone afterwards."""
    from tiny_components import tiny_unet

    from polybridge.training.trainer import _constant_context_kv

    unet = tiny_unet().requires_grad_(False).eval()
    width = unet.config.cross_attention_dim
    torch.manual_seed(0)
    base = torch.randn(1, 7, width)
    sample = torch.randn(3, unet.config.in_channels, 8, 8)
    t = torch.tensor([1, 500, 999])
    other = torch.randn(3, 7, width)

    def run(context):
        x = sample.clone().requires_grad_(True)  # the gradient flows back through every block
        pred = unet(x, t, encoder_hidden_states=context).sample
        (pred * torch.linspace(-1, 1, pred.numel()).reshape(pred.shape)).sum().backward()
        return pred.detach(), x.grad

    plain, plain_other = run(base.expand(3, -1, -1)), run(other)
    with _constant_context_kv(unet, base):
        patched = [n for n, m in unet.named_modules() if "forward" in m.__dict__]
        assert patched and all(n.endswith(("to_k", "to_v")) for n in patched)
        cached, cached_other = run(base.expand(3, -1, -1)), run(other)
        again = run(base.expand(3, -1, -1))
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]
    for a, b in ((plain, cached), (plain_other, cached_other), (plain, again)):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
