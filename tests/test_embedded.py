"""The embedded-default build: its pieces on toy sizes, and the whole script in smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polybridge.synthetic.batches import render_batch
from polybridge.synthetic.scenes import sample_scenes
from polybridge.embedded import tiny_backbone as E
from polybridge.training.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from polybridge.training.snr import min_snr_weights, timestep_snr

REPO = Path(__file__).resolve().parent.parent


def test_standardising_the_latent_keeps_reconstructions_and_evens_channels():
    cfg = E.EmbeddedConfig.smoke()
    torch.manual_seed(0)
    vae = E.make_vae(cfg).eval()
    x = render_batch(sample_scenes(8, 1, "test"), cfg.image_size)
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        stats = E.standardise_latents(vae, cfg)
        after = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert torch.allclose(before, after, atol=1e-4), "folding the normalisation must not change reconstructions"
    assert all(abs(m) < 1e-3 for m in stats["mean_after"]), stats
    assert all(abs(s - 1) < 1e-3 for s in stats["std_after"]), stats
    assert any(abs(s - 1) > 0.05 for s in stats["std"]), "an untrained VAE's latent is not unit-variance to begin with"


def test_clip_tokenizer_makes_whole_words(tmp_path):
    texts = ["a large red circle on the left, on a black background"] * 50 + ["a small blue star at the top"] * 50
    tok = E.train_clip_tokenizer(texts, tmp_path / "tok", vocab_size=400, max_length=16)
    ids = tok("a large red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 6, tok.convert_ids_to_tokens(ids)
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again("a small blue star")["input_ids"] == tok("a small blue star")["input_ids"]


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", {"m": model}, 7, opt, extra={"note": "x"})
    assert checkpoint_step(tmp_path / "ck") == 7
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = load_checkpoint(tmp_path / "ck", {"m": other}, other_opt)
    assert state == {"step": 7, "note": "x"}
    assert torch.equal(other.weight, model.weight)
    assert other_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert checkpoint_step(tmp_path / "nothing") is None


def test_build_script_smoke_then_resume(tmp_path):
    """Every stage runs; stock diffusers loads the result; a second run resumes and changes nothing."""
    out, work = tmp_path / "tiny", tmp_path / "work"
    cmd = [sys.executable, str(REPO / "scripts/build_default.py"), "--smoke", "--out", str(out), "--work", str(work),
           "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir()
    weights = sorted(p.name for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt"))
    assert weights and all(w.endswith(".safetensors") for w in weights), weights
    assert load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))["conv_in.weight"].dtype == torch.float16
    if (REPO / "polybridge/assets/scorer/config.json").is_file():
        report = json.loads((out / "eval.json").read_text())
        assert set(report["accuracy"]) == {"1.0", "3.0", "7.5"}
        build = json.loads((out / "polybridge_build.json").read_text())
        assert {"shape", "colour", "position"} <= set(build["vae_latent_stats"]["reconstruction_accuracy"])

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    image = pipe("a large red circle on the left, on a black background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    before = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    proc = subprocess.run(cmd + ["--skip-eval"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step" in proc.stdout
    after = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_build_script_refuses_other_settings_in_the_same_work_dir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cfg = replace(E.EmbeddedConfig.smoke(), vae_steps=99)
    (work / "config.json").write_text(json.dumps(E.config_dict(cfg)))
    proc = subprocess.run([sys.executable, str(REPO / "scripts/build_default.py"), "--smoke", "--out",
                           str(tmp_path / "o"), "--work", str(work)], capture_output=True, text=True)
    assert proc.returncode == 2 and "other settings" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_default_schedule_reaches_pure_noise_and_predicts_v():
    cfg = E.EmbeddedConfig()
    train, infer = E.make_train_scheduler(cfg), E.make_inference_scheduler(cfg)
    assert train.alphas_cumprod[-1] == 0, "zero terminal SNR: the last training step holds no image"
    assert train.alphas_cumprod[0] > 0.99
    infer.set_timesteps(25)
    assert int(infer.timesteps[0]) == 999, "trailing spacing: sampling starts at the pure-noise step it was trained on"
    assert infer.config.prediction_type == train.config.prediction_type == "v_prediction"
    eps = replace(cfg, prediction_type="epsilon", zero_terminal_snr=False)
    assert E.make_train_scheduler(eps).alphas_cumprod[-1] > 1e-3  # SD 1.x's schedule, kept for comparison


def test_swapped_in_schedulers_do_not_clip_the_latents(tmp_path):
    # DDIM/DDPM clip the predicted sample to [-1, 1] unless the config says otherwise; the standardised latents
    # leave that range, so the saved config records clip_sample=False (and DPM-Solver loads it silently).
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    E.make_inference_scheduler(E.EmbeddedConfig()).save_pretrained(tmp_path)
    assert DDIMScheduler.from_pretrained(tmp_path).config.clip_sample is False
    assert DDPMScheduler.from_pretrained(tmp_path).config.clip_sample is False
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path).config.timestep_spacing == "trailing"


def test_bad_schedule_settings_are_named():
    with pytest.raises(ValueError, match="zero_terminal_snr=True needs prediction_type='v_prediction'"):
        E.make_train_scheduler(replace(E.EmbeddedConfig(), prediction_type="epsilon"))
    with pytest.raises(ValueError, match="prediction_type='sample' is not valid"):
        E.make_inference_scheduler(replace(E.EmbeddedConfig(), prediction_type="sample"))


def test_min_snr_weights_keep_the_pure_noise_end():
    snr = torch.tensor([0.0, 0.5, 4.0, 100.0])
    v = min_snr_weights(snr, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([1.0, 1.0, 1.0, 5 / 101])), v  # x0-weight min(snr + 1, 5)
    eps = min_snr_weights(snr[1:], 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 5 / 100])), eps
    with pytest.raises(ValueError, match="prediction_type 'sample' has no min-SNR weighting"):
        min_snr_weights(snr, 5.0, "sample")
    with pytest.raises(ValueError, match="gamma must be positive"):
        min_snr_weights(snr, 0.0, "epsilon")


def test_timestep_snr_reads_the_schedule():
    sched = E.make_train_scheduler(E.EmbeddedConfig())
    t = torch.tensor([0, 500, 999])
    snr = timestep_snr(sched.alphas_cumprod, t)
    a = sched.alphas_cumprod[t]
    assert torch.allclose(snr, a / (1 - a))
    assert snr[2] == 0 and snr[0] > snr[1] > 0  # zero terminal SNR at the last step