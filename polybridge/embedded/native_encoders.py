"""Native text encoders of the embedded default: one tiny CLIP per language, trained on its own captions.

Each non-English language gets a transformers :class:`~transformers.CLIPTextModel` that knows its
language and nothing of the backbone's text space (as Chinese-CLIP knows nothing of SD's CLIP): it is
trained *contrastively* on that language's captions of rendered synthetic scenes against its own small
image tower, never against the backbone. A branch later reads its token states (``last_hidden_state``)
through cross-attention, so every object's attributes must be recoverable from them.

What is trained, per language (all of it from scratch, seeded):

- **text tower**: ``CLIPTextModel`` (hidden 96, 3 layers, 4 heads, 64 positions; the backbone's text
  encoder is 64 wide, so the widths differ as BDM's 1024 differs from SD's 768), pooled at the first
  ``</s>`` (id 3, the tokenizer's eos; CLIP's own pooling rule), then a linear ``text_projection``.
- **image tower**: four conv blocks (GroupNorm, GELU) on 32x32 images, 32 -> 16 -> 8 -> 4 pixels, the
  4x4 map *flattened* (global pooling would throw away where an object is), a linear layer to image
  features, then a linear ``image_projection``.
- **losses**: (1) CLIP's symmetric InfoNCE with a learned temperature. The world is small, so a batch
  holds pairs whose captions say the same thing (a lantern and a pagoda are both "an object" in
  Japanese); those are false negatives for plain InfoNCE. Pairs whose *described* scene is identical
  (:func:`text_targets` equal) count as positives, with the target spread evenly over them.
  (2) Attribute losses from the text: background, and per position object-or-empty over
  ``world.OBJECTS`` (plus one class for an object the language does not name), colour and size; the
  targets are :func:`polybridge.synthetic.scorer.scene_targets`. Read twice, both times *linearly*:
  from the pooled ``</s>`` state (:class:`AttributeProbe`), and from all token states through one
  cross-attention layer with a learned query per position (:class:`TokenProbe`), which is how a branch
  reads them. They make the token states provably carry every attribute, and they converge in a few
  hundred steps where InfoNCE alone would need thousands. (3) The same loss on the image features, with
  full object ids (the image shows a lantern even where the caption says "object"), so the image tower
  is a usable feature extractor for CLIPScore- and FID-style figures.
  All attribute losses use label smoothing 0.1: training never shows a held-out (object, colour) pair,
  and with hard targets a model learns "a circle is never red" and overrides the word "red" on the test
  split (held-out colour accuracy 0.65 -> 0.86 on zh validation with smoothing); linear read-outs
  instead of MLPs helped held-out shapes further (token probe 0.66 -> 0.83). Held-out pairs remain the
  weak spot; ``polybridge_encoder.json`` reports them separately.
- **data**: per step, half the scenes from the language's own pool (generic shapes plus the concepts it
  names, so it learns its concept words) and half from the whole world (so it learns the word for an
  unnamed object), training split only (held-out (object, colour) pairs never seen); captions from the
  registry's grammar, no empty captions (the branch trainer adds its own caption dropout). Data is a
  pure function of (seed, step): a resumed run continues with the same batches.

Saved (atomically) into the language's ``encoder`` folder: the ``CLIPTextModel`` via ``save_pretrained``
(fp16 safetensors, config recording float32 so a plain ``from_pretrained`` loads float32),
``polybridge_encoder.json`` (how it was made, final metrics) and ``contrastive/`` (image tower,
projections, probes and temperature as safetensors plus a config), which :class:`ContrastiveModel`
loads for CLIPScore-style metrics. :func:`polybridge.embedded.world_clip.build_world_clip` makes the English one the same way: the
synthetic world's own CLIP for CLIPScore / FID, with its tokenizer copied inside it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polybridge.atomic import atomic_dir
from polybridge.embedded.tiny_backbone import keep_float32_by_default
from polybridge.errors import PolyBridgeError, PolyBridgeValueError
from polybridge.schedules import warmup_cosine
from polybridge.seeding import step_seed
from polybridge.synthetic.batches import render_batch
from polybridge.synthetic.scenes import is_heldout, sample_scenes
from polybridge.synthetic.scorer import scene_targets, scorer_loss
from polybridge.synthetic.world import BACKGROUNDS, COLOURS, CONCEPTS, OBJECTS, POSITIONS, SIZES, Scene
from polybridge.training.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint

INFO_FILE = "polybridge_encoder.json"
CONTRASTIVE_DIR = "contrastive"
CONTRASTIVE_CONFIG = "config.json"
CONTRASTIVE_WEIGHTS = "model.safetensors"
CONTRASTIVE_FORMAT = "polybridge-native-clip"

#: Text-side object classes: every world object, then "empty", then "an object this language does not name".
TEXT_OBJECT_CLASSES: tuple[str, ...] = OBJECTS + ("empty", "unnamed")
EMPTY_CLASS = len(OBJECTS)
UNNAMED_CLASS = len(OBJECTS) + 1

#: tokenizer ids fixed by polybridge.tokenizer (pad 0, unk 1, bos 2, eos 3).
PAD_ID, BOS_ID, EOS_ID = 0, 2, 3


class NativeEncoderError(PolyBridgeError, RuntimeError):
    """A native encoder cannot be built or loaded; the message names the path and what to do."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NativeEncoderConfig:
    """Sizes and schedule of one native encoder; :meth:`smoke` gives toy sizes and three steps."""

    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 64
    projection_dim: int = 96
    image_size: int = 32
    image_widths: tuple[int, ...] = (32, 48, 64, 96)
    image_features: int = 192
    probe_hidden: int = 0
    image_probe_hidden: int = 192
    steps: int = 700
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 30
    attribute_weight: float = 1.0
    token_attribute_weight: float = 1.0
    image_attribute_weight: float = 0.5
    label_smoothing: float = 0.1
    dropout: float = 0.0
    own_fraction: float = 0.5
    seed: int = 0
    checkpoint_every: int = 100
    eval_scenes: int = 1024
    eval_batch: int = 64

    @classmethod
    def smoke(cls) -> "NativeEncoderConfig":
        return cls(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, projection_dim=16,
                   image_widths=(8, 8, 16, 16), image_features=32, image_probe_hidden=32, steps=3, batch=8,
                   warmup=1, checkpoint_every=1, eval_scenes=16, eval_batch=8)

    def check(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.image_size % 8:
            problems.append(f"image_size={self.image_size} must be a multiple of 8 (three 2x poolings)")
        if len(self.image_widths) != 4:
            problems.append(f"image_widths={self.image_widths} must have 4 entries (4 conv blocks)")
        for name in ("steps", "batch", "checkpoint_every", "eval_scenes", "eval_batch"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.batch < 2:
            problems.append(f"batch={self.batch}: contrastive training needs at least 2 pairs per batch")
        if not 0.0 <= self.own_fraction <= 1.0:
            problems.append(f"own_fraction={self.own_fraction} must be in [0, 1]")
        if problems:
            raise PolyBridgeValueError("NativeEncoderConfig: " + "; ".join(problems))


def config_dict(cfg: NativeEncoderConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


# --------------------------------------------------------------------------- model


def make_text_model(cfg: NativeEncoderConfig, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, projection_dim=cfg.projection_dim,
        dropout=cfg.dropout, attention_dropout=cfg.dropout, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    return CLIPTextModel(config)


class ImageTower(nn.Module):
    """Four conv blocks (32 -> 16 -> 8 -> 4 px), the 4x4 map flattened, then a linear layer to features."""

    def __init__(self, image_size: int, widths: Sequence[int], features: int):
        super().__init__()
        w1, w2, w3, w4 = widths

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU())

        self.trunk = nn.Sequential(block(3, w1), nn.MaxPool2d(2), block(w1, w2), nn.MaxPool2d(2),
                                   block(w2, w3), nn.MaxPool2d(2), block(w3, w4))
        side = image_size // 8
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(w4 * side * side, features), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, 3, S, S] in [-1, 1] (as :func:`render_batch` gives) -> features [B, F]."""
        return self.head(self.trunk(x))


def _head(dim: int, hidden: int, out: int) -> nn.Module:
    """A linear read-out (``hidden`` 0) or a one-hidden-layer MLP."""
    if hidden <= 0:
        return nn.Linear(dim, out)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class AttributeProbe(nn.Module):
    """Background, and per position object (or empty), colour and size, read from one vector."""

    def __init__(self, dim: int, hidden: int, n_objects: int):
        super().__init__()
        self.n_pos, self.n_obj, self.n_col, self.n_size = len(POSITIONS), n_objects, len(COLOURS), len(SIZES)
        per = n_objects + self.n_col + self.n_size
        self.net = _head(dim, hidden, len(BACKGROUNDS) + self.n_pos * per)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(h)
        nb = len(BACKGROUNDS)
        rest = out[:, nb:].reshape(len(h), self.n_pos, -1)
        return {
            "background": out[:, :nb],
            "objects": rest[..., :self.n_obj],
            "colour": rest[..., self.n_obj:self.n_obj + self.n_col],
            "size": rest[..., self.n_obj + self.n_col:],
        }


class TokenProbe(nn.Module):
    """The attributes read from *all* token states the way a branch reads them: learned queries (one for
    the background, one per position) cross-attend over the states, then shared output layers."""

    def __init__(self, dim: int, heads: int, hidden: int, n_objects: int):
        super().__init__()
        self.n_pos, self.n_obj, self.n_col, self.n_size = len(POSITIONS), n_objects, len(COLOURS), len(SIZES)
        self.queries = nn.Parameter(torch.randn(1 + self.n_pos, dim) * dim ** -0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.background = nn.Linear(dim, len(BACKGROUNDS))
        self.slot = _head(dim, hidden, n_objects + self.n_col + self.n_size)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q = self.queries.unsqueeze(0).expand(len(states), -1, -1)
        pad = None if attention_mask is None else attention_mask == 0
        h, _ = self.attn(q, states, states, key_padding_mask=pad, need_weights=False)
        h = self.norm(h + q)
        slots = self.slot(h[:, 1:])
        return {
            "background": self.background(h[:, 0]),
            "objects": slots[..., :self.n_obj],
            "colour": slots[..., self.n_obj:self.n_obj + self.n_col],
            "size": slots[..., self.n_obj + self.n_col:],
        }


class ContrastiveModel(nn.Module):
    """A tiny CLIP: ``text`` (a CLIPTextModel) and ``image`` towers, projections, probes and a temperature."""

    def __init__(self, cfg: NativeEncoderConfig, vocab_size: int, text_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.text = text_model if text_model is not None else make_text_model(cfg, vocab_size)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.image = ImageTower(cfg.image_size, cfg.image_widths, cfg.image_features)
        self.image_projection = nn.Linear(cfg.image_features, cfg.projection_dim, bias=False)
        self.text_probe = AttributeProbe(cfg.hidden_size, cfg.probe_hidden, len(TEXT_OBJECT_CLASSES))
        self.token_probe = TokenProbe(cfg.hidden_size, cfg.num_heads, cfg.probe_hidden, len(TEXT_OBJECT_CLASSES))
        self.image_probe = AttributeProbe(cfg.image_features, cfg.image_probe_hidden, len(OBJECTS) + 1)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def text_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(last_hidden_state [B, T, H], pooled [B, H])."""
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings [B, projection_dim]."""
        return F.normalize(self.text_projection(self.text_pooled(input_ids, attention_mask)), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, projection_dim]; ``images`` in [-1, 1], [B, 3, S, S]."""
        return F.normalize(self.image_projection(self.image(images)), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unprojected image features [B, image_features] (for FID-style statistics)."""
        return self.image(images)

    # ------------------------------------------------------------------ io

    def contrastive_state(self) -> dict[str, torch.Tensor]:
        """Everything but the text model (which is saved with ``save_pretrained``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text.")}

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype = torch.float32) -> "ContrastiveModel":
        """Load a folder written by :func:`train_native_encoder` or :func:`~polybridge.embedded.world_clip.build_world_clip`."""
        from safetensors.torch import load_file
        from transformers import CLIPTextModel

        folder = Path(folder)
        cfg_file, weights = folder / CONTRASTIVE_DIR / CONTRASTIVE_CONFIG, folder / CONTRASTIVE_DIR / CONTRASTIVE_WEIGHTS
        for f in (folder / "config.json", cfg_file, weights):
            if not f.is_file():
                raise NativeEncoderError(f"{f}: missing; build it with `python scripts/build_encoders.py`")
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
        if meta.get("format") != CONTRASTIVE_FORMAT:
            raise NativeEncoderError(f"{cfg_file}: key 'format' is {meta.get('format')!r}, expected {CONTRASTIVE_FORMAT!r}")
        if meta.get("objects") != list(OBJECTS) or meta.get("text_object_classes") != list(TEXT_OBJECT_CLASSES):
            raise NativeEncoderError(f"{cfg_file}: its class lists differ from polybridge/synthetic/world.py; "
                                     "these weights were trained for another world, rebuild them")
        cfg = NativeEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        text = CLIPTextModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        model = cls(cfg, text.config.vocab_size, text_model=text)
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("text.")]
        if missing or unexpected:
            raise NativeEncoderError(f"{weights}: tensors do not match {cfg_file} (missing {missing[:5]}, "
                                     f"unexpected {list(unexpected)[:5]})")
        return model.to(torch_dtype).eval()


# --------------------------------------------------------------------------- targets and losses


def text_targets(scenes: Sequence[Scene], named: Sequence[str]) -> dict[str, torch.Tensor]:
    """:func:`scene_targets`, with objects a caption cannot name (concepts not in ``named``) as ``unnamed``.

    Object classes are :data:`TEXT_OBJECT_CLASSES`: world objects, ``empty``, ``unnamed``.
    """
    t = scene_targets(scenes)
    obj = t["objects"].clone()
    for i, concept in enumerate(OBJECTS):
        if concept in CONCEPTS and concept not in named:
            obj[obj == i] = UNNAMED_CLASS
    return {**t, "objects": obj}


def _keys(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per scene: everything its caption says (equal rows = captions that describe the same scene)."""
    return torch.cat([targets["background"][:, None], targets["objects"], targets["colour"], targets["size"]], dim=1)


def same_described(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, B] bool: pairs whose captions describe the same scene."""
    k = _keys(targets)
    return (k[:, None, :] == k[None, :, :]).all(-1)


def attribute_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """:func:`polybridge.synthetic.scorer.scorer_loss` (same targets, same terms) with label smoothing.

    Smoothing spreads the target evenly over every wrong class, so nothing rewards a model for ruling
    out a combination it never saw (a held-out (object, colour) pair): the words decide, not the prior.
    """
    if not label_smoothing:
        return scorer_loss(logits, targets)

    def ce(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x, t, ignore_index=-100, label_smoothing=label_smoothing)

    return (ce(logits["background"], targets["background"])
            + ce(logits["objects"].flatten(0, 1), targets["objects"].flatten())
            + ce(logits["colour"].flatten(0, 1), targets["colour"].flatten())
            + ce(logits["size"].flatten(0, 1), targets["size"].flatten()))


def contrastive_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; every pair marked in ``positives`` (diagonal included) is a positive."""
    logits = logit_scale.exp().clamp(max=100.0) * text_emb @ image_emb.t()
    target = positives.float() / positives.float().sum(dim=1, keepdim=True)
    t2i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    i2t = -(target.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (t2i + i2t) / 2


# --------------------------------------------------------------------------- data


def _own_concepts(registry, code: str) -> tuple[str, ...]:
    entry = registry.language(code)
    if entry.synthetic is None:
        raise NativeEncoderError(f"{entry.file}: language {code!r} has no 'synthetic:' section (a grammar), "
                                 "so it has no captions to train an encoder on")
    return tuple(entry.synthetic.concepts)


def batch_scenes(cfg: NativeEncoderConfig, code: str, concepts: Sequence[str], split: str, seed: int,
                 n: int) -> list[Scene]:
    """``n`` scenes: ``own_fraction`` of them from the language's pool (shapes + its concepts), the rest from the world."""
    n_own = int(round(n * cfg.own_fraction))
    own = sample_scenes(n_own, step_seed(seed, f"native-{code}-own", 0), split, concepts=concepts) if n_own else []
    world = sample_scenes(n - n_own, step_seed(seed, f"native-{code}-world", 0), split) if n > n_own else []
    return own + world


def _captions(captioner, code: str, scenes: Sequence[Scene], seed: int) -> list[str]:
    rng = random.Random(step_seed(seed, f"native-{code}-caption", 0))
    return [captioner(s, code, rng) for s in scenes]


def _tokenize(tokenizer, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids = enc["input_ids"]
    if not bool((ids == EOS_ID).any(dim=1).all()):
        raise NativeEncoderError(f"a caption tokenized without </s> (id {EOS_ID}); is this a polybridge tokenizer "
                                 f"(pad 0, unk 1, <s> 2, </s> 3)? first ids: {ids[0, :8].tolist()}")
    return ids, enc["attention_mask"]


def load_language_tokenizer(path: Path | str):
    """The tokenizer at ``path``; a missing or broken folder is an error naming it."""
    from polybridge.tokenizer import TokenizerError, load_tokenizer

    if not isinstance(path, Path):
        raise NativeEncoderError(f"tokenizer source {path!r} is a hub id; the embedded encoders train on local "
                                 "polybridge tokenizers (languages/<code>/tokenizer)")
    try:
        tok = load_tokenizer(path)
    except TokenizerError as exc:
        raise NativeEncoderError(f"tokenizer {path}: {exc}; build it with "
                                 f"`polybridge tokenizer build --lang {path.parent.name}` "
                                 "or `python scripts/build_tokenizers.py`") from exc
    ids = tok("a")["input_ids"]
    if tok.pad_token_id != PAD_ID or ids[0] != BOS_ID or ids[-1] != EOS_ID:
        raise NativeEncoderError(f"tokenizer {path}: expected pad {PAD_ID}, <s> {BOS_ID} first and </s> {EOS_ID} "
                                 f"last, got pad {tok.pad_token_id} and ids {ids}")
    return tok


# --------------------------------------------------------------------------- training


def _lr_lambda(cfg: NativeEncoderConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        return warmup_cosine(step, cfg.warmup, cfg.steps, floor=0.02)

    return f


def _build(cfg: NativeEncoderConfig, vocab_size: int) -> ContrastiveModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ContrastiveModel(cfg, vocab_size)


def _optimizer(model: ContrastiveModel, cfg: NativeEncoderConfig):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def train_step_losses(model: ContrastiveModel, cfg: NativeEncoderConfig, ids: torch.Tensor, mask: torch.Tensor,
                      images: torch.Tensor, t_targets: dict, i_targets: dict) -> dict[str, torch.Tensor]:
    states, pooled = model.text_states(ids, mask)
    feats = model.image(images)
    text_emb = F.normalize(model.text_projection(pooled), dim=-1)
    image_emb = F.normalize(model.image_projection(feats), dim=-1)
    nce = contrastive_loss(text_emb, image_emb, model.logit_scale, same_described(t_targets))
    ls = cfg.label_smoothing
    t_attr = attribute_loss(model.text_probe(pooled), t_targets, ls)
    k_attr = attribute_loss(model.token_probe(states, mask), t_targets, ls)
    i_attr = attribute_loss(model.image_probe(feats), i_targets, ls)
    total = nce + cfg.attribute_weight * t_attr + cfg.token_attribute_weight * k_attr \
        + cfg.image_attribute_weight * i_attr
    return {"loss": total, "nce": nce, "text_attr": t_attr, "token_attr": k_attr, "image_attr": i_attr}


def train_native_encoder(registry, code: str, out_dir: str | Path, work_dir: str | Path,
                         cfg: NativeEncoderConfig | None = None, *, tokenizer_path: str | Path | None = None,
                         command: str | None = None, progress: bool = True, copy_tokenizer: bool = False,
                         callback: Callable[[int, dict[str, float]], None] | None = None,
                         log: Callable[[str], None] = print) -> dict:
    """Train (or resume) language ``code``'s native CLIP text encoder and write it to ``out_dir``.

    ``registry``: a loaded :class:`~polybridge.registry.Registry`. ``out_dir``: where the encoder goes
    (normally ``registry.language(code).encoder_source``), replaced atomically. ``work_dir``: this
    language's checkpoints; run the same call again after a kill and it continues from the last one
    (``checkpoint_every`` steps). ``tokenizer_path`` defaults to the entry's tokenizer folder (given
    for English, whose entry has no encoder). ``callback(step, losses)`` runs after every step (and its
    checkpoint). ``copy_tokenizer`` puts a copy of the tokenizer in ``out_dir/tokenizer`` (for a folder
    that must stand alone, like the world CLIP). Returns what ``polybridge_encoder.json`` records: config, steps, timing, test metrics.
    """
    from polybridge.synthetic.captions import Captioner

    cfg = cfg or NativeEncoderConfig()
    cfg.check()
    entry = registry.language(code)
    concepts = _own_concepts(registry, code)
    if tokenizer_path is None:
        if entry.tokenizer_source is None:
            raise NativeEncoderError(f"{entry.file}: language {code!r} has no encoder entry, so no tokenizer is "
                                     "named; pass tokenizer_path (e.g. languages/en/tokenizer)")
        tokenizer_path = entry.tokenizer_source
    elif not isinstance(tokenizer_path, Path):
        tokenizer_path = Path(tokenizer_path)
    tokenizer = load_language_tokenizer(tokenizer_path)
    captioner = Captioner(registry, [code])
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = {"language": code, "config": config_dict(cfg), "tokenizer": str(tokenizer_path),
                "vocab_size": len(tokenizer)}
    saved = work_dir / "settings.json"
    if saved.is_file():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise NativeEncoderError(f"{saved}: the checkpoints in {work_dir} were made with other settings "
                                     f"({', '.join(changed)} differ); use another work folder or delete it")
    else:
        saved.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    model = _build(cfg, len(tokenizer))
    opt, sched = _optimizer(model, cfg)
    ckpt = work_dir / "checkpoint"
    start = 0
    if checkpoint_step(ckpt) is not None:
        start = load_checkpoint(ckpt, {"model": model}, opt, sched)["step"]
        log(f"{code}: resuming at step {start} from {ckpt}")
    started = time.time()
    cpu_started = time.process_time()
    model.train()
    bar = _progress(range(start, cfg.steps), start, cfg.steps, f"encoder {code}", progress)
    losses: dict[str, float] = {}
    for step in bar:
        seed = step_seed(cfg.seed, f"native-{code}", step)
        scenes = batch_scenes(cfg, code, concepts, "train", seed, cfg.batch)
        ids, mask = _tokenize(tokenizer, _captions(captioner, code, scenes, seed), cfg.max_position_embeddings)
        images = render_batch(scenes, cfg.image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout masks are a function of the step too
            parts = train_step_losses(model, cfg, ids, mask, images, text_targets(scenes, concepts),
                                      scene_targets(scenes))
        if not torch.isfinite(parts["loss"]):
            raise FloatingPointError(f"{code}: loss is {parts['loss'].item()} at step {step}; "
                                     f"last good checkpoint kept in {ckpt}")
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses = {k: round(v.item(), 4) for k, v in parts.items()}
        if progress:
            bar.set_postfix(loss=f"{losses['loss']:.3f}", nce=f"{losses['nce']:.3f}", attr=f"{losses['text_attr']:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt, {"model": model}, step + 1, opt, sched, extra={"losses": losses})
        if callback is not None:
            callback(step + 1, losses)
    train_seconds = time.time() - started
    train_cpu = time.process_time() - cpu_started
    model.eval()
    metrics = evaluate_model(model, tokenizer, captioner, code, concepts, cfg)
    info = {
        "format": 1,
        "language": code,
        "name": entry.name,
        "what": "CLIPTextModel trained contrastively (symmetric InfoNCE, learned temperature, same-description "
                "pairs as positives) on synthetic-world captions against its own image tower, plus attribute "
                "losses on the pooled text state and on the image features; see polybridge/embedded/native_encoders.py",
        "config": config_dict(cfg),
        "steps": cfg.steps,
        "resumed_from_step": start or None,
        "seed": cfg.seed,
        "tokenizer": _relative(tokenizer_path),
        "vocab_size": len(tokenizer),
        "concepts": list(concepts),
        "text_object_classes": list(TEXT_OBJECT_CLASSES),
        "hidden_size": cfg.hidden_size,
        "train_seconds_this_run": round(train_seconds, 1),
        "train_cpu_seconds_this_run": round(train_cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "final_losses": losses,
        "metrics": metrics,
        "command": command if command is not None else " ".join(sys.argv),
        "versions": _versions(),
    }
    save_native_encoder(model, out_dir, info, tokenizer_dir=tokenizer_path if copy_tokenizer else None)
    return info


def save_native_encoder(model: ContrastiveModel, out_dir: str | Path, info: dict,
                        tokenizer_dir: str | Path | None = None) -> Path:
    """Write the text model (fp16 safetensors, float32 in its config), ``contrastive/`` and the info file, atomically."""
    import copy

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    text = copy.deepcopy(model.text).to(torch.float16)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        text.save_pretrained(str(tmp), safe_serialization=True)
        keep_float32_by_default(tmp)
        sub = tmp / CONTRASTIVE_DIR
        sub.mkdir()
        state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.contrastive_state().items()}
        save_file(state, str(sub / CONTRASTIVE_WEIGHTS), metadata={"format": CONTRASTIVE_FORMAT})
        meta = {"format": CONTRASTIVE_FORMAT, "version": 1, "config": config_dict(model.cfg),
                "objects": list(OBJECTS), "text_object_classes": list(TEXT_OBJECT_CLASSES),
                "backgrounds": list(BACKGROUNDS), "colours": list(COLOURS), "sizes": list(SIZES),
                "positions": list(POSITIONS), "image_input": "RGB in [-1, 1], [B, 3, S, S] (render_batch)",
                "language": info.get("language")}
        (sub / CONTRASTIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(model: ContrastiveModel, tokenizer, captioner, code: str, concepts: Sequence[str],
                   cfg: NativeEncoderConfig, split: str = "test", seed: int = 12345) -> dict:
    """Text->image top-1 within batches of ``eval_batch`` scenes, and attribute-probe accuracy, on ``split``.

    Scenes are drawn as in training (half the language's pool, half the world); ``split="test"`` includes
    the held-out (object, colour) pairs, reported separately too. ``retrieval_top1`` counts only the
    exact image; ``retrieval_top1_same_description`` also accepts an image the caption describes equally
    well (its text targets are identical, e.g. an unnamed concept swapped for another).
    """
    model.eval()
    scenes = batch_scenes(cfg, code, concepts, split, seed, cfg.eval_scenes)
    captions = _captions(captioner, code, scenes, seed)
    t_targets = text_targets(scenes, concepts)
    i_targets = scene_targets(scenes)
    strict, same, probes, tok_probes, img_probes = [], [], [], [], []
    for start in range(0, len(scenes), cfg.eval_batch):
        sl = slice(start, start + cfg.eval_batch)
        ids, mask = _tokenize(tokenizer, captions[sl], cfg.max_position_embeddings)
        states, pooled = model.text_states(ids, mask)
        feats = model.image(render_batch(scenes[sl], cfg.image_size))
        t = F.normalize(model.text_projection(pooled), dim=-1)
        i = F.normalize(model.image_projection(feats), dim=-1)
        best = (t @ i.t()).argmax(dim=1)
        n = len(best)
        strict.append(best == torch.arange(n))
        described = same_described({k: v[sl] for k, v in t_targets.items()})
        same.append(described[torch.arange(n), best])
        probes.append({k: v.argmax(-1) for k, v in model.text_probe(pooled).items()})
        tok_probes.append({k: v.argmax(-1) for k, v in model.token_probe(states, mask).items()})
        img_probes.append({k: v.argmax(-1) for k, v in model.image_probe(feats).items()})
    strict_t, same_t = torch.cat(strict), torch.cat(same)
    heldout = torch.tensor([is_heldout(s) for s in scenes])
    text_pred = {k: torch.cat([p[k] for p in probes]) for k in probes[0]}
    image_pred = {k: torch.cat([p[k] for p in img_probes]) for k in img_probes[0]}
    token_pred = {k: torch.cat([p[k] for p in tok_probes]) for k in tok_probes[0]}
    text_acc = attribute_accuracy(text_pred, t_targets, heldout)
    token_acc = attribute_accuracy(token_pred, t_targets, heldout)
    image_acc = attribute_accuracy(image_pred, i_targets, heldout)
    return {
        "split": split,
        "n_scenes": len(scenes),
        "n_heldout_scenes": int(heldout.sum()),
        "retrieval_batch": cfg.eval_batch,
        "retrieval_top1": _mean(strict_t),
        "retrieval_top1_same_description": _mean(same_t),
        "retrieval_top1_heldout": _mean(strict_t[heldout]),
        "chance_top1": 1 / cfg.eval_batch,
        "text_probe": text_acc,
        "token_probe": token_acc,
        "image_probe": image_acc,
        "logit_scale": round(float(model.logit_scale.exp()), 3),
    }


def attribute_accuracy(pred: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                       heldout: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy of probe predictions: background per scene; object per position (empty included);
    shape, colour and size per true object; ``scene`` when everything in a scene is right."""
    obj_t, col_t, size_t = targets["objects"], targets["colour"], targets["size"]
    present = col_t != -100
    bg_ok = pred["background"] == targets["background"]
    slot_ok = pred["objects"] == obj_t
    col_ok = (pred["colour"] == col_t) | ~present
    size_ok = (pred["size"] == size_t) | ~present
    scene_ok = bg_ok & (slot_ok & col_ok & size_ok).all(dim=1)
    out = {
        "background": _mean(bg_ok),
        "position_slots": _mean(slot_ok),
        "shape": _mean(slot_ok[present]),
        "colour": _mean((pred["colour"] == col_t)[present]),
        "size": _mean((pred["size"] == size_t)[present]),
        "scene": _mean(scene_ok),
    }
    if heldout is not None and bool(heldout.any()):
        h = heldout[:, None] & present
        out["heldout_colour"] = _mean((pred["colour"] == col_t)[h])
        out["heldout_shape"] = _mean(slot_ok[h])
        out["heldout_scene"] = _mean(scene_ok[heldout])
    return out


def evaluate_native_encoder(registry, code: str, folder: str | Path | None = None, *,
                            tokenizer_path: str | Path | None = None, split: str = "test", seed: int = 12345,
                            n_scenes: int | None = None, batch: int = 64) -> dict:
    """Load a saved encoder folder (default: the entry's ``encoder`` folder) and measure it on ``split``.

    Returns text->image retrieval top-1 within batches of ``batch`` scenes and the attribute-probe
    accuracy (see :func:`evaluate_model`). For the English world CLIP pass its folder; its tokenizer is
    read from ``folder/tokenizer`` when present.
    """
    from polybridge.synthetic.captions import Captioner

    entry = registry.language(code)
    folder = Path(folder) if folder is not None else entry.encoder_source
    if not isinstance(folder, Path):
        raise NativeEncoderError(f"{entry.file}: encoder.source {folder!r} is a hub id; evaluate_native_encoder "
                                 "measures the embedded encoders trained here (give folder=)")
    if tokenizer_path is None:
        tokenizer_path = folder / "tokenizer" if (folder / "tokenizer").is_dir() else entry.tokenizer_source
    model = ContrastiveModel.from_pretrained(folder)
    cfg = replace(model.cfg, eval_batch=batch, eval_scenes=n_scenes or model.cfg.eval_scenes)
    tokenizer = load_language_tokenizer(Path(tokenizer_path))
    return evaluate_model(model, tokenizer, Captioner(registry, [code]), code, _own_concepts(registry, code), cfg,
                          split=split, seed=seed)


# --------------------------------------------------------------------------- helpers


def _mean(x: torch.Tensor) -> float:
    return round(float(x.float().mean()), 4) if x.numel() else math.nan


def _progress(it, start: int, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, initial=start, total=total, desc=desc, dynamic_ncols=True)


def _relative(path: Any) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parent.parent.parent))
    except (ValueError, TypeError):
        return str(path)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def encoder_size_bytes(folder: str | Path) -> int:
    """Bytes of the text encoder's weights in ``folder`` (what a branch loads)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
