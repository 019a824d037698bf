"""Toy plugins for the embedded backbone: what the plugin benchmark applies, built as community plugins are.

Each is trained on the English side only (the backbone's own text encoder and English captions of rendered scenes;
no branch, no native text), saved in its ecosystem's own format and loaded by the stock loaders
(:mod:`polybridge.plugins`):

- ``outline-lora``: a style LoRA (peft, diffusers' ``pytorch_lora_weights.safetensors``) with the English trigger
  ``outline style``: objects drawn as outlines.
- ``layout-controlnet``: a ``ControlNetModel`` folder reading a box layout map
  (:func:`~polybridge.synthetic.render.render_hint` ``kind="box"``): objects where the boxes are, as big as them.
- ``kite-ti``: a Textual Inversion embedding (diffusers' one-key safetensors) for ``<kite>``, the object no
  language's captions name.
- ``navy-checkpoint``: a fine-tune of the whole backbone (a diffusers folder) that draws every background navy.

:data:`TOY_PLUGINS` is what a plugin is (the benchmark reads it); ``scripts/build_toy_plugins.py`` builds them.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polybridge.atomic import atomic_dir
from polybridge.errors import PolyBridgeValueError
from polybridge.schedules import warmup_cosine
from polybridge.seeding import step_seed
from polybridge.synthetic.scenes import sample_scenes
from polybridge.synthetic.world import UNNAMED_OBJECTS, Scene
from polybridge.training.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from polybridge.training.snr import min_snr_weights, timestep_snr

#: Where the committed toy plugins live (``registry.yaml``'s ``plugins:`` points here).
TOY_PLUGIN_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "plugins"


@dataclass(frozen=True)
class ToyPlugin:
    """One toy plugin: how a user applies it and what it changes in the world."""

    name: str  # its name in registry.yaml's plugins
    kind: str  # lora | controlnet | textual_inversion | checkpoint
    words: str  # the English words a user adds for it (a trigger, a token); "" for none
    effect: str  # what the plugin scorer reads as its effect: style | layout | unnamed | background
    target: str  # the style, hint kind, unnamed object or background it draws


TOY_PLUGINS: tuple[ToyPlugin, ...] = (
    ToyPlugin("outline-lora", "lora", "outline style", "style", "outline"),
    ToyPlugin("layout-controlnet", "controlnet", "", "layout", "box"),
    ToyPlugin("kite-ti", "textual_inversion", "<kite>", "unnamed", "kite"),
    ToyPlugin("navy-checkpoint", "checkpoint", "", "background", "navy"),
)


def toy_plugin(name: str) -> ToyPlugin:
    for plugin in TOY_PLUGINS:
        if plugin.name == name:
            return plugin
    raise PolyBridgeValueError(f"no toy plugin {name!r}; toy plugins: {', '.join(p.name for p in TOY_PLUGINS)}")


# --------------------------------------------------------------------------- building them


@dataclass
class ToyTrainConfig:
    """How a toy plugin is trained (the defaults are the committed builds')."""

    steps: int = 1200
    batch: int = 32
    lr: float = 1e-3  # LoRA, ControlNet and the embedding; the checkpoint fine-tune uses lr_full
    lr_full: float = 1e-4
    warmup: int = 50
    seed: int = 0
    scenes: int = 8192  # scenes rendered and encoded once per build
    lora_rank: int = 8
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 200
    empty_caption_rate: float = 0.1  # the ControlNet: 0.5 (it must learn the layout from the hint)


def _english_captions(captioner: Any, code: str, scenes: Sequence[Scene], rng: random.Random,
                      words: str) -> list[str]:
    """English captions of ``scenes``, with the plugin's words (its trigger or token) where a user puts them."""
    return [captioner(s, code, rng) + (f", {words}" if words else "") for s in scenes]


class _Data:
    """The build's scenes, each in the two forms training needs: what the plugin draws (its latents) and what the
    prompt says (the scene captions are made from), plus the hint a ControlNet reads."""

    def __init__(self, plugin: ToyPlugin, cfg: ToyTrainConfig, vae: Any, work: Path):
        from polybridge.embedded.tiny_backbone import encode_scenes_cached
        from polybridge.synthetic.batches import images_to_tensor
        from polybridge.synthetic.render import render_hint

        said = sample_scenes(cfg.scenes, step_seed(cfg.seed, f"toy-{plugin.name}", 0), "train",
                             objects=UNNAMED_OBJECTS if plugin.effect == "unnamed" else None)
        if plugin.effect == "style":
            drawn = [replace(s, objects=tuple(replace(o, style=plugin.target) for o in s.objects)) for s in said]
        elif plugin.effect == "background":
            drawn = [replace(s, background=plugin.target) for s in said]
        else:
            drawn = said
        self.said = said
        self.latents = encode_scenes_cached(vae, drawn, 32, work / "latents.safetensors")
        # a ControlNet reads its hint in [0, 1], as diffusers' ControlNet pipelines hand it over
        self.hints = (images_to_tensor([render_hint(s, 32, plugin.target) for s in said]) * 0.5 + 0.5
                      if plugin.effect == "layout" else None)


class _Trainee:
    """What one kind of plugin trains: its modules (checkpointed), its parameters, how it conditions the UNet, and
    how it is written in its ecosystem's format."""

    def __init__(self, plugin: ToyPlugin, backbone: Any, cfg: ToyTrainConfig):
        self.plugin, self.backbone, self.cfg = plugin, backbone, cfg
        self.unet, self.text = backbone.unet, backbone.text_encoder
        kind = plugin.kind
        if kind == "lora":
            from peft import LoraConfig

            self.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            self.params = [p for n, p in self.unet.named_parameters() if "lora" in n]
            self.modules = {"unet": self.unet}
        elif kind == "controlnet":
            from diffusers import ControlNetModel

            torch.manual_seed(cfg.seed)
            # a layout net reads no text: plain down blocks mirror the UNet's residuals at a fraction of its weights
            self.net = ControlNetModel.from_config({
                **ControlNetModel.from_unet(self.unet).config,
                "down_block_types": ["DownBlock2D"] * len(self.unet.config.block_out_channels),
                "mid_block_type": "UNetMidBlock2D", "conditioning_embedding_out_channels": [16, 32, 64]})
            self.params = list(self.net.parameters())
            self.modules = {"controlnet": self.net}
        elif kind == "textual_inversion":
            tok = backbone.tokenizer
            tok.add_tokens([plugin.words])
            self.token_id = tok.convert_tokens_to_ids(plugin.words)
            self.text.resize_token_embeddings(len(tok), mean_resizing=False)
            emb = self.text.get_input_embeddings().weight
            with torch.no_grad():  # start from the English word the captions use for it
                emb[self.token_id] = emb[tok(" object", add_special_tokens=False).input_ids[0]]
            emb.requires_grad_(True)
            self.params = [emb]
            self.modules = {"text_encoder": self.text}
        elif kind == "checkpoint":
            self.params = list(self.unet.parameters())
            self.modules = {"unet": self.unet}
        else:
            raise PolyBridgeValueError(f"toy plugin {plugin.name!r}: unknown kind {kind!r}")
        for p in self.params:
            p.requires_grad_(True)

    @property
    def lr(self) -> float:
        return self.cfg.lr_full if self.plugin.kind == "checkpoint" else self.cfg.lr

    def predict(self, xt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, hints: torch.Tensor | None) -> torch.Tensor:
        if self.plugin.kind == "textual_inversion":
            states = self.text(ids).last_hidden_state
        else:
            with torch.no_grad():
                states = self.text(ids).last_hidden_state
        extra = {}
        if hints is not None:
            down, mid = self.net(xt, t, encoder_hidden_states=states, controlnet_cond=hints, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(xt, t, encoder_hidden_states=states, **extra).sample

    def after_step(self) -> None:
        """Textual Inversion: every embedding row but the new token's stays as it was."""
        if self.plugin.kind == "textual_inversion":
            grad = self.text.get_input_embeddings().weight.grad
            if grad is not None:
                keep = grad[self.token_id].clone()
                grad.zero_()
                grad[self.token_id] = keep

    def save(self, out: Path, source: Path) -> None:
        """Write the plugin in its ecosystem's format, fp16, atomically."""
        with atomic_dir(out, overwrite=True) as tmp:
            if self.plugin.kind == "lora":
                from diffusers import StableDiffusionPipeline
                from peft.utils import get_peft_model_state_dict

                state = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(self.unet).items()}
                StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, safe_serialization=True)
            elif self.plugin.kind == "controlnet":
                self.net.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
                self.net.to(torch.float32)
            elif self.plugin.kind == "textual_inversion":
                from safetensors.torch import save_file

                row = self.text.get_input_embeddings().weight[self.token_id].detach()
                save_file({self.plugin.words: row[None].to(torch.float16).contiguous()},
                          str(tmp / "learned_embeds.safetensors"))
            else:  # the backbone folder as it is, with the fine-tuned UNet
                shutil.rmtree(tmp)
                skip = shutil.ignore_patterns("*.png", "eval*.json", "README.md", "polybridge_build.json")
                shutil.copytree(source, tmp, ignore=skip)
                self.unet.to(torch.float16).save_pretrained(tmp / "unet", safe_serialization=True)
                self.unet.to(torch.float32)
                from polybridge.embedded.tiny_backbone import keep_float32_by_default

                keep_float32_by_default(tmp / "unet")


def build_toy_plugin(plugin: ToyPlugin, out: Path, work: Path, cfg: ToyTrainConfig | None = None,
                     registry: Any = None, log: Callable[[str], None] = print,
                     stop_at: int | None = None) -> dict[str, Any]:
    """Train ``plugin`` on the registry's default backbone (English side only) and write it to ``out``.

    Resumable: ``work`` keeps the encoded scenes and a checkpoint every ``checkpoint_every`` steps; the data order
    and the noise are pure functions of (seed, step), so a resumed build equals an uninterrupted one. ``stop_at``
    ends early at that step with a checkpoint and writes nothing to ``out`` (as a build cut short would)."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from polybridge.backbones import load_backbone
    from polybridge.registry import load_registry
    from polybridge.synthetic.captions import Captioner

    cfg = cfg or ToyTrainConfig()
    registry = registry if registry is not None else load_registry()
    backbone = load_backbone(registry)
    english = registry.backbone().language
    captioner = Captioner(registry, [english])
    work.mkdir(parents=True, exist_ok=True)
    data = _Data(plugin, cfg, backbone.vae, work)
    trainee = _Trainee(plugin, backbone, cfg)
    noise_sched = DDPMScheduler.from_config(backbone.scheduler.config)
    opt = torch.optim.AdamW(trainee.params, lr=trainee.lr, weight_decay=0.0 if plugin.kind != "checkpoint" else 1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    ckpt = work / "checkpoint"
    start = 0
    if checkpoint_step(ckpt) is not None:
        start = load_checkpoint(ckpt, trainee.modules, opt, sched)["step"]
        log(f"{plugin.name}: resuming at step {start}")
    empty_rate = 0.5 if plugin.kind == "controlnet" else cfg.empty_caption_rate
    for m in trainee.modules.values():
        m.train()
    started, loss_value = time.time(), float("nan")
    end = cfg.steps if stop_at is None else max(start, min(stop_at, cfg.steps))
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=plugin.name, dynamic_ncols=True)
    for step in bar:
        rng = random.Random(step_seed(cfg.seed, f"toy-{plugin.name}", step))
        idx = [rng.randrange(len(data.said)) for _ in range(cfg.batch)]
        # the trigger or token is what the plugin answers to: it is never dropped with the rest of the caption
        captions = _english_captions(captioner, english, [data.said[i] for i in idx], rng, plugin.words)
        captions = [plugin.words if rng.random() < empty_rate else c for c in captions]
        ids = backbone.tokenizer(captions, padding="max_length", max_length=backbone.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, f"toy-{plugin.name}-noise", step))
        x0 = data.latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = trainee.predict(xt, t, ids, None if data.hints is None else data.hints[idx])
        prediction_type = noise_sched.config.prediction_type
        target = noise if prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        weights = min_snr_weights(timestep_snr(noise_sched.alphas_cumprod, t), cfg.min_snr_gamma, prediction_type)
        loss = (weights * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{plugin.name}: loss is {loss.item()} at step {step}; the last good checkpoint "
                                     f"stays in {ckpt}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        trainee.after_step()
        torch.nn.utils.clip_grad_norm_(trainee.params, 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.steps, end):
            save_checkpoint(ckpt, trainee.modules, step + 1, opt, sched)
    info = {"plugin": plugin.name, "steps": end, "loss": loss_value, "seconds": round(time.time() - started, 1),
            "resumed_at": start}
    if end < cfg.steps:
        return info
    for m in trainee.modules.values():
        m.eval()
    trainee.save(out, Path(registry.backbone_source(registry.default_backbone)))
    return info
