"""The embedded default backbone ``polybridge-tiny``: a real Stable Diffusion architecture, only tiny.

Stages (each resumable from its last checkpoint, data order a pure function of (seed, step)):

1. ``vae``: an AutoencoderKL 32x32x3 -> 8x8x4, trained on rendered scenes (L1 + MSE + a weak KL).
   Its latent is then *standardised per channel*, with the shift and scale folded into
   ``quant_conv`` / ``post_quant_conv``, so stock pipelines (one global ``scaling_factor`` = 1)
   see unit-variance channels. ``research/feasibility.md`` found colour lost in one heavy-tailed
   latent channel; a KL weight of 1e-5 gives light-tailed channels, standardising evens them.
2. ``tokenizer``: a CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``) trained on English captions.
3. ``unet``: a UNet2DConditionModel and a CLIPTextModel trained together on cached latents and
   English captions (about 10% empty, for classifier-free guidance), EMA weights.
   v-prediction on Stable Diffusion's betas rescaled to zero terminal SNR (as SD 2.x and
   Lin et al. 2023): with SD 1.x's epsilon-prediction the last step still leaks 7% of the image,
   an 8x8 latent's layout is read from the starting noise, and the loss (x0-weight = SNR) barely
   teaches the text -> layout map at high noise. The 6000-step epsilon build placed objects
   at chance (position 0.47, the same on training prompts); see the README's Status.
   Loss weight: min-SNR-gamma counted on SNR + 1, so the pure-noise end keeps weight 1.
4. ``save``: the backbone in diffusers format, fp16 safetensors, loadable by
   ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from polybridge.atomic import atomic_dir, atomic_write_bytes
from polybridge.errors import PolyBridgeValueError
from polybridge.schedules import warmup_cosine
from polybridge.seeding import step_seed
from polybridge.synthetic.batches import render_batch
from polybridge.synthetic.scenes import sample_scenes
from polybridge.synthetic.world import Scene
from polybridge.training.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from polybridge.training.snr import min_snr_weights, timestep_snr

EMPTY_CAPTION_RATE = 0.1


@dataclass(frozen=True)
class EmbeddedConfig:
    """Sizes and schedules of the embedded default; ``smoke()`` shrinks every stage to a few steps."""

    image_size: int = 32
    seed: int = 0
    # vae
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 8
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    # text encoder and tokenizer
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_max_length: int = 48
    tokenizer_vocab: int = 600
    tokenizer_captions: int = 20000
    # unet
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 2
    unet_head_dim: int = 8
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    latent_cache: int = 60000
    checkpoint_every: int = 250

    @classmethod
    def smoke(cls) -> "EmbeddedConfig":
        return cls(vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, unet_warmup=1, latent_cache=16,
                   tokenizer_captions=300, checkpoint_every=2, vae_channels=(8, 16, 16), unet_channels=(16, 32),
                   unet_layers_per_block=1, text_hidden=32, text_layers=1, text_heads=2)


# --------------------------------------------------------------------------- vae


def make_vae(cfg: EmbeddedConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1,
        norm_num_groups=min(16, cfg.vae_channels[0]), sample_size=cfg.image_size, scaling_factor=1.0,
    )


def train_vae(work: Path, cfg: EmbeddedConfig, log: Callable[[str], None] = print):
    """Train (or resume) the VAE; returns it with its latent standardised per channel."""
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 100, cfg.vae_steps))
    ckpt = work / "vae"
    start = 0
    if checkpoint_step(ckpt) is not None:
        start = load_checkpoint(ckpt, {"vae": vae}, opt, sched)["step"]
        log(f"vae: resuming at step {start}")
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae", dynamic_ncols=True)
    for step in bar:
        x = render_batch(sample_scenes(cfg.vae_batch, step_seed(cfg.seed, "vae", step), "train"), cfg.image_size)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=torch.Generator().manual_seed(step))).sample
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_checkpoint(ckpt, {"vae": vae}, step + 1, opt, sched)
    vae.eval()
    stats = standardise_latents(vae, cfg)
    log(f"vae: latent mean before {stats['mean']}, std before {stats['std']}")
    return vae, stats


@torch.no_grad()
def latent_stats(vae, cfg: EmbeddedConfig, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = sample_scenes(n, step_seed(cfg.seed, "vae-stats", 0), "train")
    zs = [vae.encode(render_batch(scenes[i:i + 256], cfg.image_size)).latent_dist.mean for i in range(0, n, 256)]
    z = torch.cat(zs)
    return z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))


@torch.no_grad()
def standardise_latents(vae, cfg: EmbeddedConfig) -> dict:
    """Fold a per-channel affine map into the VAE so its latents have mean 0 and std 1 per channel.

    Encoder side: ``mean' = (mean - m) / s`` and ``logvar' = logvar - 2 log s`` (rows of ``quant_conv``).
    Decoder side: ``post_quant_conv`` gets ``z = s * z' + m`` folded into its weights.
    """
    m, s = latent_stats(vae, cfg)
    c = cfg.latent_channels
    qc = vae.quant_conv
    qc.weight[:c] /= s[:, None, None, None]
    qc.bias[:c] = (qc.bias[:c] - m) / s
    qc.bias[c:] -= 2 * torch.log(s)
    pq = vae.post_quant_conv
    pq.bias += (pq.weight[:, :, 0, 0] @ m)
    pq.weight *= s[None, :, None, None]
    m2, s2 = latent_stats(vae, cfg)
    return {"mean": [round(v, 3) for v in m.tolist()], "std": [round(v, 3) for v in s.tolist()],
            "mean_after": [round(v, 3) for v in m2.tolist()], "std_after": [round(v, 3) for v in s2.tolist()]}


@torch.no_grad()
def reconstruction_accuracy(vae, cfg: EmbeddedConfig, scorer, n: int = 300) -> dict[str, float]:
    """Ground-truth attribute accuracy of VAE reconstructions of ``n`` test-split scenes.

    The UNet can draw no better than its VAE decodes, so this bounds every later figure.
    """
    scenes = sample_scenes(n, step_seed(cfg.seed, "vae-eval", 0), "test")
    images = []
    for i in range(0, n, 100):
        x = render_batch(scenes[i:i + 100], cfg.image_size)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        images.append(((rec.clamp(-1, 1) + 1) * 127.5).round() / 255.0)  # as 8-bit images, like the pipeline's
    result = scorer.score(torch.cat(images), scenes)
    return {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}


# --------------------------------------------------------------------------- tokenizer and text encoder


def train_clip_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int, max_length: int):
    """A CLIP BPE tokenizer (lower-cased, ``</w>`` word ends, byte-level alphabet) trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False, special_tokens=[])
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    for ch in alphabet:  # CLIP's layout: every byte, then every byte as a word end, then merges
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2))
    tok = CLIPTokenizer.from_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return tok


def make_text_encoder(cfg: EmbeddedConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.text_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(cfg: EmbeddedConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 4, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_head_dim,
        norm_num_groups=min(32, cfg.unet_channels[0]),
    )


def _schedule(cfg: EmbeddedConfig) -> dict:
    """Stable Diffusion 1.x's betas (so the backbone behaves like SD for every scheduler), rescaled to
    zero terminal SNR and with its prediction type when ``cfg`` asks (then sampled with trailing steps)."""
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise PolyBridgeValueError(f"prediction_type={cfg.prediction_type!r} is not valid; use 'epsilon' or 'v_prediction'")
    if cfg.zero_terminal_snr and cfg.prediction_type == "epsilon":
        raise PolyBridgeValueError("zero_terminal_snr=True needs prediction_type='v_prediction' (noise is all there is at the last step)")
    extra = {"rescale_betas_zero_snr": True} if cfg.zero_terminal_snr else {}
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=cfg.prediction_type, **extra)


def make_train_scheduler(cfg: EmbeddedConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(clip_sample=False, **_schedule(cfg))


def make_inference_scheduler(cfg: EmbeddedConfig):
    from diffusers import DPMSolverMultistepScheduler

    spacing = "trailing" if cfg.zero_terminal_snr else "leading"  # trailing: the first step starts from pure noise
    scheduler = DPMSolverMultistepScheduler(**_schedule(cfg), timestep_spacing=spacing, steps_offset=1)
    # Recorded for the schedulers people swap in with `.from_config` (as SD 1.5's config does): DDIM and DDPM
    # clip the predicted sample to [-1, 1] by default, which ruins this backbone's standardised latents (DDIM on
    # 200 validation prompts: 0.09 mean accuracy clipped). DPM-Solver ignores the key.
    scheduler.register_to_config(clip_sample=False)
    return scheduler


# --------------------------------------------------------------------------- unet + text encoder


@torch.no_grad()
def cache_latents(vae, cfg: EmbeddedConfig, work: Path) -> tuple[torch.Tensor, list[Scene]]:
    """Encode ``latent_cache`` training scenes once (the VAE is frozen from here on)."""
    scenes = sample_scenes(cfg.latent_cache, step_seed(cfg.seed, "unet-data", 0), "train")
    return encode_scenes_cached(vae, scenes, cfg.image_size, work / "latents.safetensors"), scenes


@torch.no_grad()
def encode_scenes_cached(vae, scenes: Sequence[Scene], size: int, path: Path) -> torch.Tensor:
    """The VAE latents (posterior means) of ``scenes`` rendered at ``size``, read from ``path`` when it holds as
    many, else encoded in chunks and written there atomically."""
    if path.is_file():
        latents = load_file(str(path))["latents"]
        if latents.shape[0] == len(scenes):
            return latents
    chunks = []
    for i in tqdm(range(0, len(scenes), 512), desc="encode latents", dynamic_ncols=True):
        chunks.append(vae.encode(render_batch(scenes[i:i + 512], size)).latent_dist.mean)
    latents = torch.cat(chunks).contiguous()
    atomic_write_bytes(path, save_tensors({"latents": latents}))
    return latents


def train_unet(work: Path, cfg: EmbeddedConfig, vae, tokenizer, caption: Callable[[Scene, random.Random], str],
               log: Callable[[str], None] = print, stop_at: int | None = None):
    """Train (or resume) the UNet and the text encoder together; returns their EMA copies.

    ``stop_at`` ends the stage early at that step (the schedule stays the one of ``cfg.unet_steps``),
    so a shorter build is reproducible and can later resume to the full length.
    """
    latents, scenes = cache_latents(vae, cfg, work)
    torch.manual_seed(cfg.seed)
    unet, text = make_unet(cfg), make_text_encoder(cfg, tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    total = cfg.unet_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.unet_warmup, total))
    noise_sched = make_train_scheduler(cfg)
    ckpt = work / "unet"
    start = 0
    if checkpoint_step(ckpt) is not None:
        start = load_checkpoint(ckpt, {"unet": unet, "text_encoder": text, "ema_unet": ema_unet,
                                       "ema_text_encoder": ema_text}, opt, sched)["step"]
        log(f"unet: resuming at step {start}")
    unet.train()
    text.train()
    end = total if stop_at is None else max(start, min(stop_at, total))
    bar = tqdm(range(start, end), initial=start, total=total, desc="unet", dynamic_ncols=True)
    for step in bar:
        rng = random.Random(step_seed(cfg.seed, "unet", step))
        idx = [rng.randrange(len(scenes)) for _ in range(cfg.unet_batch)]
        captions = ["" if rng.random() < EMPTY_CAPTION_RATE else caption(scenes[i], rng) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=cfg.text_max_length, truncation=True,
                        return_tensors="pt").input_ids
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, "unet-noise", step))
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        states = text(ids).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=states).sample
        target = noise if cfg.prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        weights = min_snr_weights(timestep_snr(noise_sched.alphas_cumprod, t), cfg.min_snr_gamma, cfg.prediction_type)
        loss = (weights * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"unet: loss is {loss.item()} at step {step}; last good checkpoint kept in {ckpt}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (total, end):
            save_checkpoint(ckpt, {"unet": unet, "text_encoder": text, "ema_unet": ema_unet,
                                   "ema_text_encoder": ema_text}, step + 1, opt, sched)
    return ema_unet.eval(), ema_text.eval()


def save_backbone(out: Path, cfg: EmbeddedConfig, vae, unet, text_encoder, tokenizer, extra: dict | None = None) -> Path:
    """Write the backbone in diffusers format as fp16 safetensors, atomically (its scheduler: ``cfg``'s)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_inference_scheduler(cfg), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe = pipe.to(torch.float16)
    with atomic_dir(out, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        keep_float32_by_default(tmp / "text_encoder")
        (tmp / "polybridge_build.json").write_text(json.dumps(extra or {}, indent=2, default=str))
    return out


def keep_float32_by_default(folder: Path) -> None:
    """Weights are stored in fp16 to keep the repository small, but transformers 5 loads a model in
    the dtype its config records while diffusers loads in float32: record float32, so every component
    of a plain ``from_pretrained`` agrees (pass ``torch_dtype=torch.float16`` for half precision)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def config_dict(cfg: EmbeddedConfig) -> dict:
    return asdict(cfg)
