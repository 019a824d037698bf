"""Benchmark metrics: ground-truth attribute accuracy, CLIPScore-style similarity, FID-style distance.

- **Attribute accuracy** (synthetic suites): the ground-truth scorer (:mod:`polybridge.synthetic.scorer`) reads
  every object back from each image and :func:`polybridge.eval.attributes.prompt_accuracy` reduces it to what
  the native prompt asked for (background, colour, size, position, shape; concept objects count in ``shape``
  because the native prompt names them). ``concept`` is the shape accuracy on the language's own concept
  objects alone, ``per_concept`` the same per concept, ``scene`` the share of images with everything right.
- **CLIPScore** (``clip_t``): ``100 * cos(image, text)`` averaged over the suite, computed by torchmetrics'
  :class:`~torchmetrics.multimodal.clip_score.CLIPScore`. On the synthetic suites the model is the world's own
  CLIP (``polybridge/assets/world-clip``, English-only) and the text is the scene's English caption, so it sees
  what English can say (a concept is "an object" there: ``concept`` covers the rest). On the curated suites it
  is the CLIP model the language's entry names (``benchmark.clip_model``, e.g. ``BAAI/AltCLIP-m18``: one
  multilingual model for every language keeps the figures comparable) and the text is the native prompt.
  ``clip_i`` is the same metric between each generated image and the rendered ground-truth scene.
- **FID** (``fid``): torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` with the world
  CLIP's image tower (its 192 unprojected image features) as the custom feature extractor, between the
  generated images and the rendered ground-truth scenes of the same suite. With fewer images than features
  (``--quick``) the covariances are rank-deficient: compare such figures only within one run.

Why these libraries: torchmetrics' FID and CLIPScore are maintained, widely used implementations whose
constructors accept custom models (FID: any ``nn.Module`` returning ``(N, d)`` features; CLIPScore: a callable
returning a model with ``get_image_features`` / ``get_text_features`` and a processor), so the world CLIP, a
transformers CLIP (AltCLIP, Chinese-CLIP, CLIP) and the same code path serve every suite, with nothing
downloaded. HF ``evaluate`` does not fit: it has no FID or CLIPScore module of its own and fetches metric
scripts from the hub at load time, which no machine here can reach.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from polybridge.errors import PolyBridgeError

#: What each metric means, for reports (key: one line).
METRIC_HELP: dict[str, str] = {
    "accuracy": "ground-truth attribute accuracy: mean of background, shape, colour, size, position (scorer)",
    "shape": "share of objects whose shape (concept included) the scorer reads as asked",
    "colour": "share of objects in the asked colour",
    "size": "share of objects in the asked size",
    "position": "share of images with objects at exactly the asked positions",
    "background": "share of images with the asked background",
    "scene": "share of images with everything right",
    "concept": "shape accuracy on the language's own culture-specific objects",
    "clip_t": "CLIPScore, 100*cos(image, text): world CLIP and the English caption (synthetic); the entry's CLIP "
              "model and the native prompt (curated)",
    "clip_i": "CLIPScore between the image and the rendered ground-truth scene (world CLIP)",
    "fid": "FID on the world CLIP's image features against the rendered ground-truth scenes (lower is better)",
}
LOWER_IS_BETTER = frozenset({"fid"})


class MetricError(PolyBridgeError, RuntimeError):
    """A metric model cannot be loaded or used; the message names the source."""


# --------------------------------------------------------------------------- image conversion


def to_uint8_chw(images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """PIL images -> uint8 ``[3, H, W]`` tensors (the form torchmetrics' CLIPScore and HF processors take)."""
    return [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1) for im in images]


def to_float_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float ``[B, 3, H, W]`` in [0, 1]."""
    return torch.stack(to_uint8_chw(images)).float() / 255.0


def _to_model_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [0, 1] float images ``[B, 3, H, W]`` -> float in [-1, 1] at ``size`` x ``size``."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear",
                          align_corners=None if x.shape[-1] > size else False)
    return x * 2.0 - 1.0


# --------------------------------------------------------------------------- the world CLIP


class WorldClipFeatures(nn.Module):
    """The world CLIP's image tower as a torchmetrics FID feature extractor: images -> ``(N, 192)`` features."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.image = clip.image
        self.size = int(clip.cfg.image_size)
        self.num_features = int(clip.cfg.image_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image(_to_model_input(images, self.size))


class WorldClipModel(nn.Module):
    """The world CLIP with the interface torchmetrics' CLIPScore expects of a CLIP model."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.config = SimpleNamespace(name_or_path="world-clip")  # no text_config: captions are short

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.image_projection(self.clip.image(pixel_values))

    @torch.no_grad()
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip.text_projection(self.clip.text_pooled(input_ids, attention_mask))


class WorldClipProcessor:
    """Images and texts -> the world CLIP's inputs (as a transformers CLIP processor would give them)."""

    def __init__(self, tokenizer: Any, image_size: int, max_length: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_length = max_length

    def __call__(self, text: Sequence[str] | None = None, images: Sequence[torch.Tensor] | None = None,
                 return_tensors: str = "pt", padding: bool = True, **_: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = torch.cat([_to_model_input(im.unsqueeze(0), self.image_size) for im in images])
        if text is not None:
            enc = self.tokenizer(list(text), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        return out


class TransformersClip(nn.Module):
    """A transformers CLIP-style model whose ``get_*_features`` return plain tensors, as torchmetrics expects
    (transformers 5 returns a model output whose ``pooler_output`` holds the projected embedding)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        if isinstance(pooled, torch.Tensor):
            return pooled
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise MetricError(f"{type(out).__name__}: cannot find the embedding in the model's output")

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def is_world_clip(source: str | Path) -> bool:
    """Whether ``source`` is a local folder in the world-CLIP format (``contrastive/`` + ``tokenizer/``)."""
    path = Path(source)
    return (path / "contrastive" / "config.json").is_file()


class ClipBundle:
    """A CLIP model and its processor, loaded once; ``features()`` is the FID extractor (world CLIP only)."""

    def __init__(self, model: Any, processor: Any, source: str, world: nn.Module | None = None):
        self.model, self.processor, self.source, self.world = model, processor, source, world

    def factory(self) -> Callable[[], tuple[Any, Any]]:
        """What torchmetrics' ``CLIPScore(model_name_or_path=...)`` accepts: a callable giving (model, processor)."""
        return lambda: (self.model, self.processor)

    def features(self) -> WorldClipFeatures:
        if self.world is None:
            raise MetricError(f"{self.source}: FID features come from the world CLIP only")
        return WorldClipFeatures(self.world)


def load_world_clip(folder: str | Path | None = None) -> ClipBundle:
    """The synthetic world's CLIP (default: ``polybridge/assets/world-clip``) as a :class:`ClipBundle`."""
    from polybridge.embedded.native_encoders import ContrastiveModel, load_language_tokenizer
    from polybridge.embedded.world_clip import WORLD_CLIP_DIR

    folder = Path(folder) if folder is not None else WORLD_CLIP_DIR
    if not is_world_clip(folder):
        raise MetricError(f"{folder}: not a world-CLIP folder (no contrastive/config.json); build it with "
                          "`python scripts/build_encoders.py --world-clip`")
    if not (folder / "tokenizer").is_dir():
        raise MetricError(f"{folder}: no tokenizer/ folder beside the model; a world-CLIP folder carries its tokenizer")
    try:
        clip = ContrastiveModel.from_pretrained(folder)
        tokenizer = load_language_tokenizer(folder / "tokenizer")
    except Exception as exc:  # the loaders raise several types; all mean "this folder is unusable"
        raise MetricError(f"{folder}: cannot load the world CLIP: {exc}") from exc
    clip.eval().requires_grad_(False)
    processor = WorldClipProcessor(tokenizer, int(clip.cfg.image_size), int(clip.cfg.max_position_embeddings))
    return ClipBundle(WorldClipModel(clip), processor, str(folder), world=clip)


def load_clip(source: str | Path, revision: str | None = None) -> ClipBundle:
    """A CLIP model named by a registry entry (``benchmark.clip_model``): a world-CLIP folder, or a transformers
    CLIP-style model (CLIP, AltCLIP, Chinese-CLIP: anything ``AutoModel`` loads with ``get_image_features`` and
    ``get_text_features``) with its ``AutoProcessor``, from a local folder or a hub id. Safetensors only."""
    if is_world_clip(source):
        return load_world_clip(source)
    from transformers import AutoModel, AutoProcessor

    from polybridge.registry import is_local_source

    local = Path(str(source)).is_dir() or is_local_source(str(source))
    base: dict[str, Any] = {"revision": revision} if revision and not local else {}

    def load(**kwargs: Any) -> tuple[Any, Any]:
        return (AutoModel.from_pretrained(str(source), use_safetensors=True, **base, **kwargs),
                AutoProcessor.from_pretrained(str(source), **base, **kwargs))

    try:
        try:  # a local folder, or a hub id already in the cache: no network at all
            model, processor = load(local_files_only=True)
        except OSError:
            if local:
                raise
            model, processor = load()
    except Exception as exc:  # offline hub ids, missing files, unknown architectures
        raise MetricError(f"cannot load CLIP model {source}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    for method in ("get_image_features", "get_text_features"):
        if not callable(getattr(model, method, None)):
            raise MetricError(f"{source}: {type(model).__name__} has no {method}(); name a CLIP-style model "
                              "(CLIPModel, AltCLIPModel, ChineseCLIPModel)")
    model.eval().requires_grad_(False)
    return ClipBundle(TransformersClip(model), processor, str(source))


# --------------------------------------------------------------------------- the metrics


def clip_score(bundle: ClipBundle, images: Sequence[Image.Image],
               targets: Sequence[str] | Sequence[Image.Image]) -> float:
    """torchmetrics CLIPScore between ``images`` and ``targets`` (texts, or images for image-image similarity)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if not images:
        return math.nan
    metric = CLIPScore(model_name_or_path=bundle.factory())
    target: Any = list(targets) if isinstance(targets[0], str) else to_uint8_chw(targets)  # type: ignore[arg-type]
    for start in range(0, len(images), 64):
        metric.update(to_uint8_chw(images[start:start + 64]), target[start:start + 64])
    return float(metric.compute())


def fid(features: nn.Module, real: Sequence[Image.Image], fake: Sequence[Image.Image]) -> float:
    """torchmetrics FID between two image sets on ``features`` (``nan`` with fewer than 2 images a side)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        return math.nan
    metric = FrechetInceptionDistance(feature=features, normalize=True)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), 64):
            metric.update(to_float_batch(images[start:start + 64]), real=is_real)
    return float(metric.compute())


def accuracy_metrics(scorer: Any, images: Sequence[Image.Image], scenes: Sequence[Any],
                     concepts: Sequence[str]) -> dict[str, Any]:
    """Attribute accuracy of ``images`` against ``scenes`` as the native prompts ask for it (see module doc)."""
    import warnings

    from polybridge.eval.attributes import prompt_accuracy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # images at another size than the scorer's are resized, as intended
        full = scorer.score(list(images), list(scenes))
    acc = prompt_accuracy(full, names_concepts=True)
    out: dict[str, Any] = {"accuracy": acc.pop("mean"), **acc, "scene": full["scene"]}
    if concepts:
        per = {c: full["per_concept"][c] for c in concepts}
        present = [v for v in per.values() if not math.isnan(v)]
        out["concept"] = full["shape_concept"] if present else math.nan
        out["per_concept"] = per
    return out
