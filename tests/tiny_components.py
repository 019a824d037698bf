"""Tiny random Stable Diffusion components and native encoders, built in code (nothing is downloaded).

Like diffusers' fast tests (``get_dummy_components``): a UNet with ``block_out_channels=(32, 64)`` at
8x8 latents, a 2-level VAE (16x16 images), CLIP text encoders of width 32 (backbone) and 48 / 40
(native), and a byte-level CLIP tokenizer with no merges, so any text (any script) tokenizes.
Also :func:`write_registry`: an on-disk registry whose sources are real local folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from polybridge.encoders import NativeEncoder

BOS, EOS = 512, 513  # after the 2 x 256 byte symbols


def _byte_symbols() -> list[str]:
    # GPT-2 / CLIP byte-to-unicode table: every byte has a printable symbol.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def clip_text_model(hidden_size: int, seed: int, max_positions: int = 77, layers: int = 2,
                    projection_dim: int | None = None) -> CLIPTextModel:
    """A CLIP text model; with ``projection_dim`` a ``CLIPTextModelWithProjection`` (SDXL's second encoder)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=EOS + 1, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_positions,
                            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, layer_norm_eps=1e-5,
                            projection_dim=projection_dim or 512)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def tiny_unet(block_out_channels: tuple[int, ...] = (32, 64), seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
    ).eval()


def get_dummy_components(seed: int = 0) -> dict:
    """Backbone components in the keyword form StableDiffusionPipeline / PolyBridgePipeline take."""
    unet = tiny_unet(seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2).eval()
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": clip_text_model(32, seed), "tokenizer": clip_tokenizer(77),
            "scheduler": scheduler}


def get_dummy_sdxl_components(seed: int = 0) -> dict:
    """A tiny SDXL backbone (as diffusers' SDXL fast tests build one): a ``text_time`` UNet reading two 32-wide text
    encoders' states (64 wide) and the second one's 32-wide pooled projection plus 6 size ids x 8."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=32,
    ).eval()
    vae = get_dummy_components(seed)["vae"]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return {"unet": unet, "vae": vae, "scheduler": scheduler,
            "text_encoder": clip_text_model(32, seed), "tokenizer": clip_tokenizer(77),
            "text_encoder_2": clip_text_model(32, seed + 1, projection_dim=32), "tokenizer_2": clip_tokenizer(77)}


def save_backbone(components: dict, folder: Path) -> str:
    """Save backbone components in diffusers format (an SD or an SDXL folder, by their keys); the registry
    ``architecture`` naming it."""
    if "text_encoder_2" in components:
        StableDiffusionXLPipeline(**components).save_pretrained(folder)
        return "sdxl"
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return "sd1"


def native_encoder(hidden_size: int = 48, seed: int = 1, max_length: int = 16, code: str = "zh",
                   max_chunks: int = 5) -> NativeEncoder:
    model = clip_text_model(hidden_size, seed, max_positions=max_length)
    return NativeEncoder(model, clip_tokenizer(max_length), code=code, name="./encoder", max_length=max_length,
                         max_chunks=max_chunks)


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every weight (zero convs included), as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def write_registry(root: Path, components: dict, languages: dict[str, dict]) -> Path:
    """A registry at ``root``: the backbone saved in diffusers format at ``root/model`` and one folder per
    language. ``languages`` maps a code to ``{"entry": <language.yaml overrides>, "encoder": NativeEncoder | None,
    "branch": Branch | None}``; encoders and branches given are saved where the entry points."""
    architecture = save_backbone(components, root / "model")
    top = {"version": 1, "backbones": {"tiny": {"source": "./model", "architecture": architecture, "language": "en"}},
           "default_backbone": "tiny", "fallback_language": "en", "languages": ["en", *languages]}
    (root / "registry.yaml").write_text(yaml.safe_dump(top, sort_keys=False), encoding="utf-8")
    _write_language(root, "en", {"code": "en", "name": "English", "scripts": ["Latin"],
                                 "synthetic": {"grammar": "grammar.yaml"}, "fallback": "backbone"})
    for code, spec in languages.items():
        entry = {
            "code": code, "name": code.upper(), "scripts": ["Han"],
            "encoder": {"source": "./encoder", "model_class": "CLIPTextModel", "tokenizer": "./tokenizer",
                        "max_length": 16},
            "branch": {"type": "bdm", "weights": "./branch", "scale": 1.0},
            "synthetic": {"grammar": "grammar.yaml"},
            "fallback": "zero-branch",
        }
        for key, value in spec.get("entry", {}).items():
            if isinstance(value, dict) and isinstance(entry.get(key), dict):
                entry[key] = {**entry[key], **value}
            else:
                entry[key] = value
        folder = _write_language(root, code, entry)
        if spec.get("encoder") is not None:
            spec["encoder"].model.save_pretrained(folder / "encoder")
            spec["encoder"].tokenizer.save_pretrained(folder / "tokenizer")
        if spec.get("branch") is not None:
            spec["branch"].save_pretrained(folder / "branch")
    return root / "registry.yaml"


def _write_language(root: Path, code: str, entry: dict) -> Path:
    folder = root / "languages" / code
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "language.yaml").write_text(yaml.safe_dump(entry, allow_unicode=True, sort_keys=False), encoding="utf-8")
    (folder / "grammar.yaml").write_text("# stand-in grammar\n", encoding="utf-8")
    return folder
