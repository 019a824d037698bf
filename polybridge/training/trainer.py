"""The common trainer: any language's branch, from its registry entry, on one CPU or many GPUs.

``polybridge train --lang zh`` (:func:`train_language`) reads everything from the entry: the native encoder, the
branch type and its options, the data (``data:``) and the hyperparameters (``branch.training``); command-line flags
override them (:class:`TrainOptions`). It writes the trained branch where ``branch.weights`` points, atomically,
when training ends; until then the language folder is untouched.

What a step costs: the backbone (UNet, VAE, text encoder) and the native encoder are frozen (``requires_grad``
off, eval mode; a test checks that no gradient reaches them), so every example's latent, its native token states,
the English parallel caption's backbone states (branch types that distil) and the backbone's ``""`` context are
computed once (:mod:`polybridge.training.branch_data`, cached in the work folder) and a step runs only the branch
and the frozen UNet, whose cross-attention keys and values of that constant ``""`` context are computed once too
(:func:`_constant_context_kv`); the optimizer is a fused AdamW. The backbone's prompt is ``""`` (BDM); caption
dropout replaces the native caption, and the teacher's English caption, by ``""``, for classifier-free guidance.

Processes: it runs as it is on one device, or under ``accelerate launch`` (DDP on N GPUs or N machines, DeepSpeed
ZeRO-2; ``scripts/accelerate/``). ``batch_size`` is the global batch of one optimizer step; each process takes its
own contiguous slice of every micro-batch, so ranks see disjoint shards and a run means the same whatever the
number of processes. The data order is a pure function of (seed, step): example order is a seeded permutation per
epoch, and each example's timestep, noise and caption dropout are drawn from a generator seeded by
(seed, step, position in the global batch).

Resume: every ``checkpoint_every`` steps the branch, its EMA, the optimizer and the LR schedule are written to
``<work>/checkpoint`` atomically; ``--resume`` continues from there after a kill, with the same batches, and ends
with the weights an uninterrupted run ends with. A non-finite loss stops the run before the optimizer steps, with
a message naming the step and the last good checkpoint, which is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from polybridge import limits
from polybridge.atomic import (atomic_dir, atomic_write_bytes, atomic_write_text, check_replaceable,
                              check_writable_parent, mark_ours, no_follow)
from polybridge.backbones import get_family
from polybridge.conditioning import Conditioning, compose
from polybridge.errors import PolyBridgeError
from polybridge.registry import LanguageEntry, Registry, RegistryError, TrainingSpec
from polybridge.schedules import warmup_cosine
from polybridge.seeding import step_seed
from polybridge.training.branch_data import (
    EncodedExamples,
    Examples,
    cache_key,
    chunk_counts,
    encode_backbone_text,
    encode_examples,
    load_examples,
    sharded_encodings,
    weights_digest,
)
from polybridge.training.checkpoint import STATE_FILE, checkpoint_step, load_checkpoint, save_checkpoint
from polybridge.training.snr import min_snr_weights, timestep_snr

CHECKPOINT_DIR = "checkpoint"
CACHE_DIR = "cache"
CACHE_FILE = "cache.safetensors"
LATENT_DIR = "latents"  # beside the work folders: latents shared by languages
INFO_FILE = "train_info.json"
DATA_ORDER_DIR = "data_order"
REPORT_TO = ("none", "tensorboard")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: TrainingSpec fields a command-line flag may override (TrainOptions has one field of the same name each).
SPEC_FLAGS: tuple[str, ...] = ("max_steps", "batch_size", "learning_rate", "warmup_steps", "lr_schedule",
                               "gradient_accumulation_steps", "caption_dropout", "mixed_precision",
                               "gradient_checkpointing", "ema", "checkpoint_every", "seed", "snr_gamma")
#: Spec fields that may change when a run is resumed (they do not change what is computed).
_RESUMABLE_CHANGES = ("checkpoint_every", "mixed_precision", "gradient_checkpointing")


class TrainingError(PolyBridgeError, RuntimeError):
    """Training cannot start or cannot go on; the message says why and what is kept."""


@dataclass(frozen=True)
class TrainOptions:
    """What the command line may say; ``None`` keeps the registry entry's value."""

    max_steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str | None = None
    gradient_accumulation_steps: int | None = None
    caption_dropout: float | None = None
    mixed_precision: str | None = None
    gradient_checkpointing: bool | None = None
    ema: bool | None = None
    checkpoint_every: int | None = None
    seed: int | None = None
    snr_gamma: float | None = None
    num_samples: int | None = None
    objects: str | None = None  # synthetic data: "all" or "own" (entry: data.objects)
    branch_type: str | None = None
    branch_options: Mapping[str, Any] | None = None  # added to (and overriding) the entry's branch.options
    backbone: str | None = None
    work_dir: Path | None = None
    out_dir: Path | None = None
    init_from: Path | None = None
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"
    stop_at: int | None = None
    progress: bool = True
    log_data_order: bool = False
    cache_batch: int = 256
    save_dtype: str = "float32"  # dtype the written branch is stored in (float16 halves it; it loads as float32)
    dataset: Any = None  # a datasets Dataset / IterableDataset read instead of the entry's data.dataset (its columns)


def resolve_spec(entry: LanguageEntry, options: TrainOptions) -> TrainingSpec:
    """The entry's ``branch.training`` with the flags given applied, checked."""
    assert entry.branch is not None
    spec = entry.branch.training
    changes = {k: getattr(options, k) for k in SPEC_FLAGS if getattr(options, k) is not None}
    spec = dataclasses.replace(spec, **changes)
    for name, value in dataclasses.asdict(spec).items():  # NaN passes every comparison below: refuse it first
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainingError(f"{name} must be a finite number, got {value} ({entry.file}: branch.training.{name}, "
                                "or its flag)")
    for name, high in (("learning_rate", limits.MAX_LEARNING_RATE), ("batch_size", limits.MAX_BATCH_SIZE),
                       ("max_steps", limits.MAX_TRAIN_STEPS), ("gradient_accumulation_steps", limits.MAX_BATCH_SIZE)):
        if getattr(spec, name) > high:
            raise TrainingError(f"{name} must be at most {high:,} (polybridge's limit), got {getattr(spec, name):,}")
    if options.num_samples is not None and not 1 <= options.num_samples <= limits.MAX_NUM_SAMPLES:
        raise TrainingError(f"num_samples must be from 1 to {limits.MAX_NUM_SAMPLES:,}, got {options.num_samples:,}")
    for name in ("learning_rate", "batch_size", "max_steps", "gradient_accumulation_steps", "checkpoint_every"):
        if getattr(spec, name) <= 0:
            raise TrainingError(f"{name} must be positive, got {getattr(spec, name)}")
    if spec.warmup_steps < 0:
        raise TrainingError(f"warmup_steps must be 0 or more, got {spec.warmup_steps}")
    if not 0.0 <= spec.caption_dropout < 1.0:
        raise TrainingError(f"caption_dropout must be in [0, 1), got {spec.caption_dropout}")
    if spec.snr_gamma is not None and spec.snr_gamma <= 0:
        raise TrainingError(f"snr_gamma must be positive (min-SNR weighting; 5.0 is usual), got {spec.snr_gamma}")
    if spec.mixed_precision not in ("no", "fp16", "bf16"):
        raise TrainingError(f"mixed_precision {spec.mixed_precision!r} is not one of no, fp16, bf16")
    if spec.lr_schedule not in ("constant", "cosine"):
        raise TrainingError(f"lr_schedule {spec.lr_schedule!r} is not one of constant, cosine")
    return spec


def resolve_mixed_precision(requested: str, log: Callable[[str], None] = print) -> str:
    """``requested`` if this device runs it natively: fp16 needs a GPU; bf16 a GPU or CPU with bf16 units."""
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    if requested == "fp16" and on_cpu:
        log("mixed_precision fp16 needs a GPU; training in fp32 on this CPU")
        return "no"
    if requested == "bf16":
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported() if on_cpu else torch.cuda.is_bf16_supported()
        if not native:
            log(f"this {'CPU' if on_cpu else 'GPU'} has no bf16 units (bf16 would be emulated, slower); training in fp32")
            return "no"
    return requested


def lr_lambda(spec: TrainingSpec) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps``, then constant or a cosine to zero at ``max_steps``."""

    def factor(step: int) -> float:
        return warmup_cosine(step, spec.warmup_steps, spec.max_steps, cosine=spec.lr_schedule != "constant",
                             angle_from_fraction=True)

    return factor


# --------------------------------------------------------------------------- data order


class DataOrder:
    """Which example sits at each position of the global stream: a seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(step_seed(self.seed, "branch-epoch", epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}  # epochs are visited in order
        return self._perms[epoch]

    def indices(self, step: int, batch_size: int, positions: range) -> list[int]:
        out = []
        for p in positions:
            q = step * batch_size + p
            out.append(int(self._perm(q // self.n)[q % self.n]))
        return out


def sample_draws(seed: int, step: int, positions: range, num_timesteps: int, dropout: float,
                 latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Timesteps, noise and caption-dropout flags of the samples at ``positions`` of step ``step``'s global
    batch: each from its own generator, so they do not depend on how the batch is split across processes."""
    timesteps, noises, drops = [], [], []
    for p in positions:
        rng = random.Random(f"polybridge-branch:{seed}:{step}:{p}")
        timesteps.append(rng.randrange(num_timesteps))
        drops.append(rng.random() < dropout)
        noises.append(torch.randn(latent_shape, generator=torch.Generator().manual_seed(rng.getrandbits(63))))
    return torch.tensor(timesteps, dtype=torch.long), torch.stack(noises), drops


# --------------------------------------------------------------------------- the run


@dataclass
class _Frozen:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    encoder: Any
    noise_scheduler: Any
    backbone: Any = None  # the Backbone: its family encodes text and gives the size conditioning


def _make_accelerator(spec: TrainingSpec, options: TrainOptions, work: Path, log: Callable[[str], None]):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # A fresh run state per language (``--all`` trains several in one process); the process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if options.report_to not in REPORT_TO:
        raise TrainingError(f"--report-to {options.report_to!r}: valid: {', '.join(REPORT_TO)}")
    if options.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise TrainingError("--report-to tensorboard needs the tensorboard package "
                                    "(pip install tensorboard), or use --report-to none") from None
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(spec.mixed_precision, log),
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        log_with=None if options.report_to == "none" else options.report_to,
        project_config=ProjectConfiguration(project_dir=str(work), logging_dir=str(work / "logs")),
    )
    launched = int(os.environ.get("WORLD_SIZE") or 0)  # set by torchrun / accelerate launch / deepspeed
    if launched > 1 and launched != accelerator.num_processes:
        raise TrainingError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}, so "
                            "every process would train on all the data; on CPUs launch with "
                            "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...`")
    return accelerator


def _load_frozen(registry: Registry, entry: LanguageEntry, backbone_name: str | None) -> tuple[Any, Any]:
    from polybridge.backbones import load_backbone
    from polybridge.encoders import load_encoder

    bb = load_backbone(registry, backbone_name)
    if bb.language == entry.code:
        raise RegistryError(entry.file, "code", f"{entry.code!r} is the language of backbone {bb.name!r}; it has no branch")
    encoder = load_encoder(entry)
    encoder.requires_grad_(False).eval()
    return bb, encoder


def _build_branch(branch_cls: Any, entry: LanguageEntry, unet: Any, encoder: Any, options: dict,
                  init_from: Path | None, seed: int) -> Any:
    from polybridge.branches import Branch

    assert entry.encoder is not None
    if init_from is not None:
        branch = Branch.from_pretrained(init_from, backbone_unet=unet)
        if branch.branch_type != branch_cls.branch_type:
            raise TrainingError(f"--init-from {init_from}: a {branch.branch_type!r} branch, but this run trains "
                                f"{branch_cls.branch_type!r}")
        if branch.encoder_hidden_size != encoder.hidden_size:
            raise TrainingError(f"--init-from {init_from}: reads {branch.encoder_hidden_size}-wide states, but "
                                f"encoder {entry.encoder.source!r} gives {encoder.hidden_size}")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                branch = branch_cls.from_unet(unet, encoder.hidden_size, encoder_name=entry.encoder.source, **options)
            except (TypeError, ValueError) as exc:
                raise TrainingError(f"{branch_cls.branch_type} branch options {options}: {exc}") from None
    torch.nn.Module.to(branch, dtype=torch.float32)
    branch.requires_grad_(True)
    branch.train()
    return branch


def _read_settings(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")).get("settings", {})


def _settings_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    diff = [k for k in keys if k != "training" and old.get(k) != new.get(k)]
    old_t, new_t = old.get("training", {}), new.get("training", {})
    diff += [f"training.{k}" for k in sorted(set(old_t) | set(new_t))
             if k not in _RESUMABLE_CHANGES and old_t.get(k) != new_t.get(k)]
    return diff


@dataclass
class _Plan:
    """What a run trains and where it writes, checked before anything heavy is loaded."""

    code: str
    entry: LanguageEntry
    spec: TrainingSpec
    branch_type: str
    branch_cls: Any
    branch_options: dict
    out: Path
    work: Path
    ckpt: Path


@dataclass
class _Run:
    """A run once set up: its processes, the frozen models, the branch under training and its optimizer."""

    accelerator: Any
    say: Callable[[str], None]
    per_micro: int  # examples of one accumulation step, all processes
    micro: int  # examples of one accumulation step, this process
    frozen: _Frozen
    weight_dtype: torch.dtype
    examples: Examples
    encoded: EncodedExamples
    settings: dict
    weights: dict[str, float]
    distil: bool
    model: Any
    unwrapped: Any
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    start: int
    end: int
    losses: list[list[float]]


def train_language(registry: Registry, code: str, options: TrainOptions = TrainOptions(), *,
                   log: Callable[[str], None] = print,
                   callback: Callable[[int, float, Any], None] | None = None) -> dict:
    """Train language ``code``'s branch as its registry entry says (``options`` override); returns what
    ``<work>/train_info.json`` records. ``callback(step, loss, run)`` runs after every step; ``run`` has
    ``branch`` (unwrapped), ``ema`` and ``frozen`` (unet, vae, text_encoder, tokenizer, encoder)."""
    plan = _plan_run(registry, code, options)
    run = _set_up(registry, plan, options, log)
    if options.report_to != "none":
        run.accelerator.init_trackers(f"polybridge-{code}-{plan.branch_type}",
                                      config={k: v for k, v in dataclasses.asdict(plan.spec).items()})
    started = time.time()
    seen = _train_steps(run, plan, options, callback)
    return _finish(run, plan, options, seen, time.time() - started)


def _plan_run(registry: Registry, code: str, options: TrainOptions) -> _Plan:
    """The entry, the spec with the flags applied, the branch class and options, and the output and work folders;
    every refusal that needs no model happens here, so a bad flag costs nothing and writes nothing."""
    from polybridge.branches import get_branch_class

    entry = registry.language(code)
    if entry.branch is None or entry.encoder is None:
        raise RegistryError(entry.file, "branch", f"{code!r} is the backbone's language: it has no branch to train")
    spec = resolve_spec(entry, options)
    if options.save_dtype not in SAVE_DTYPES:
        raise TrainingError(f"save_dtype {options.save_dtype!r}: valid: {', '.join(SAVE_DTYPES)}")
    branch_type = options.branch_type or entry.branch.type
    try:
        branch_cls = get_branch_class(branch_type)
    except ValueError as exc:
        raise TrainingError(f"--branch-type: {exc}") from None
    branch_options = _resolve_branch_options(entry, branch_type, branch_cls, options)
    out = options.out_dir if options.out_dir is not None else entry.branch_source
    if out is None:
        raise RegistryError(entry.file, "branch.weights", "is null, so there is nowhere to write the branch; "
                            "set it to ./branch (or pass --out DIR)")
    if isinstance(out, str):
        raise RegistryError(entry.file, "branch.weights", f"{out!r} is a hub id; training writes a local folder: "
                            "set a local path (./branch) or pass --out DIR")
    if options.out_dir is None:  # the entry names it: never replace a folder outside the language's own
        check_replaceable(out, entry.folder, f"{entry.file}: branch.weights")
    out = check_writable_parent(no_follow(out))  # a symlink is replaced as a link, never followed
    if out.exists() and any(out.iterdir()) and not (options.overwrite or options.resume):
        raise TrainingError(f"{out} already holds a branch; pass --overwrite to replace it when training ends, "
                            "or --out DIR")
    work = Path(options.work_dir) if options.work_dir is not None else registry.root / "runs" / "train" / f"{code}-{branch_type}"
    work = check_writable_parent(work.resolve() / CHECKPOINT_DIR).parent
    ckpt = work / CHECKPOINT_DIR
    if checkpoint_step(ckpt) is not None and not options.resume:
        if not options.overwrite:
            raise TrainingError(f"{ckpt} holds a checkpoint at step {checkpoint_step(ckpt)}: pass --resume to "
                                "continue it, or --overwrite to start over")
    if options.stop_at is not None and options.stop_at < 1:
        raise TrainingError(f"--stop-at must be at least 1, got {options.stop_at}")
    return _Plan(code, entry, spec, branch_type, branch_cls, branch_options, out, work, ckpt)


def _resolve_branch_options(entry: LanguageEntry, branch_type: str, branch_cls: Any, options: TrainOptions) -> dict:
    """The entry's ``branch.options`` (for its own branch type only) with ``--branch-option`` over them."""
    assert entry.branch is not None
    branch_options = dict(entry.branch.options) if branch_type == entry.branch.type else {}
    unknown = sorted(set(branch_options) - set(branch_cls.option_keys))
    if unknown:
        raise RegistryError(entry.file, f"branch.options.{unknown[0]}", f"unknown option for a {branch_type} branch",
                            valid=branch_cls.option_keys)
    unknown = sorted(set(options.branch_options or {}) - set(branch_cls.option_keys))
    if unknown:
        raise TrainingError(f"--branch-option {unknown[0]}: unknown option for a {branch_type} branch; valid: "
                            f"{', '.join(branch_cls.option_keys) or '(none)'}")
    if options.branch_options and options.init_from is not None:
        raise TrainingError("--branch-option with --init-from: the saved branch's config.json fixes its options")
    branch_options.update(options.branch_options or {})
    return branch_options


def _set_up(registry: Registry, plan: _Plan, options: TrainOptions, log: Callable[[str], None]) -> _Run:
    """Processes, the frozen models and the fresh (or ``--init-from``) branch on the device, the data encoded once,
    the optimizer and schedule, and the state of ``--resume``'s checkpoint."""
    spec, ckpt = plan.spec, plan.ckpt
    accelerator = _make_accelerator(spec, options, plan.work, log)
    processes = accelerator.num_processes
    if spec.batch_size % (spec.gradient_accumulation_steps * processes):
        raise TrainingError(f"batch_size {spec.batch_size} must be a multiple of gradient_accumulation_steps "
                            f"{spec.gradient_accumulation_steps} x {processes} processes")
    per_micro = spec.batch_size // spec.gradient_accumulation_steps  # one accumulation step, all processes
    micro = per_micro // processes  # one accumulation step, this process
    main = accelerator.is_main_process
    say = log if main else (lambda _msg: None)
    if options.overwrite and not options.resume and main and ckpt.exists():
        shutil.rmtree(ckpt)
    accelerator.wait_for_everyone()

    frozen, branch, weight_dtype, backbone = _models(registry, plan, options, accelerator)
    examples, settings, weights, distil = _data(registry, plan, options, frozen, backbone, say)
    encoded = _encodings(examples, frozen, accelerator, plan.work, settings, spec, options, weight_dtype, say)

    params = [p for p in branch.parameters() if p.requires_grad]
    # One fused kernel for all the branch's parameters instead of a Python loop over them (torch's default on a
    # CPU); the same update up to float rounding. DeepSpeed keeps the plain optimizer it partitions.
    fused = accelerator.device.type in ("cpu", "cuda") and not _is_deepspeed(accelerator)
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                  **({"fused": True} if fused else {}))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))
    ema = copy.deepcopy(branch).requires_grad_(False).eval() if spec.ema else None

    _configure_deepspeed(accelerator, micro, spec)
    model, optimizer = accelerator.prepare(branch, optimizer)
    run = _Run(accelerator, say, per_micro, micro, frozen, weight_dtype, examples, encoded, settings, weights, distil,
               model, accelerator.unwrap_model(model), optimizer, lr_scheduler, ema, 0, 0, [])
    if options.resume and checkpoint_step(ckpt) is not None:
        state = _load_training_state(accelerator, ckpt, _modules(run), optimizer, lr_scheduler)
        run.start = int(state["step"])
        run.losses = [list(x) for x in state.get("losses", [])]
        say(f"{plan.code}: resuming at step {run.start} from {ckpt}")
    run.end = spec.max_steps if options.stop_at is None else min(options.stop_at, spec.max_steps)
    if run.start > run.end:
        raise TrainingError(f"{ckpt} is at step {run.start}, past --stop-at {run.end}")
    return run


def _models(registry: Registry, plan: _Plan, options: TrainOptions,
            accelerator: Any) -> tuple[_Frozen, Any, torch.dtype, dict[str, str]]:
    """The frozen backbone and native encoder, cast to the run's precision on its device; the branch (float32);
    and what the settings record of the backbone (name, architecture fingerprint, weights digest)."""
    from diffusers import DDPMScheduler

    bb, encoder = _load_frozen(registry, plan.entry, options.backbone)
    unet = bb.unet
    backbone_digest = weights_digest(unet)  # before any cast: the same weights give the same digest at any precision
    branch = _build_branch(plan.branch_cls, plan.entry, unet, encoder, plan.branch_options, options.init_from,
                           plan.spec.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (*bb.frozen_modules(), encoder.model):
        torch.nn.Module.to(module, device=device, dtype=weight_dtype)  # ModelMixin.to warns on every cast
    torch.nn.Module.to(branch, device=device)
    frozen = _Frozen(unet=unet, vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, encoder=encoder,
                     noise_scheduler=DDPMScheduler.from_config(bb.scheduler.config), backbone=bb)
    if plan.spec.gradient_checkpointing:
        if getattr(branch, "_supports_gradient_checkpointing", False):
            branch.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    backbone = {"backbone": bb.name, "backbone_fingerprint": bb.fingerprint, "backbone_weights": backbone_digest}
    return frozen, branch, weight_dtype, backbone


def _data(registry: Registry, plan: _Plan, options: TrainOptions, frozen: _Frozen, backbone: dict[str, str],
          say: Callable[[str], None]) -> tuple[Examples, dict, dict[str, float], bool]:
    """The examples at the backbone's image size, the run's settings (what a resume must match), the loss weights,
    and whether the branch distils from the English caption (only where the data has one)."""
    spec, entry = plan.spec, plan.entry
    vae_scale = 2 ** (len(frozen.vae.config.block_out_channels) - 1)
    sample_size = frozen.unet.config.sample_size
    latent_side = sample_size if isinstance(sample_size, int) else sample_size[0]
    image_size = latent_side * vae_scale
    weights = {"denoise": spec.denoise_weight, "distill_output": spec.distill_output_weight,
               "distill_features": spec.distill_weight}
    distil = plan.branch_cls.distills and (spec.distill_output_weight > 0 or spec.distill_weight > 0)
    if distil and (entry.data is None or entry.data.english_column is None):
        say(f"{plan.code}: data.english_column is not set, so the {plan.branch_type} branch trains with the "
            "denoising loss only")
        distil = False
    examples = load_examples(registry, entry, image_size=image_size, seed=spec.seed, num_samples=options.num_samples,
                             need_english=distil, objects=options.objects, dataset=options.dataset)
    assert entry.encoder is not None
    settings = {
        "language": plan.code, "branch_type": plan.branch_type, "branch_options": plan.branch_options,
        **backbone, "encoder": entry.encoder.source, "data": examples.description,
        "init_from": str(options.init_from or ""), "training": dataclasses.asdict(spec),
    }
    if options.resume and checkpoint_step(plan.ckpt) is not None:
        changed = _settings_diff(_read_settings(plan.ckpt), settings)
        if changed:
            raise TrainingError(f"{plan.ckpt}: the checkpoint was made with other settings ({', '.join(changed)} "
                                "differ); resume with the same ones, or pass --overwrite (without --resume) to start over")
    elif options.resume:
        say(f"{plan.code}: no checkpoint in {plan.ckpt}; starting from step 0")
    return examples, settings, weights, distil


def _modules(run: _Run) -> dict[str, torch.nn.Module]:
    """What a checkpoint holds besides the optimizer and the schedule."""
    return {"branch": run.unwrapped, **({"ema": run.ema} if run.ema is not None else {})}


def _train_steps(run: _Run, plan: _Plan, options: TrainOptions,
                 callback: Callable[[int, float, Any], None] | None) -> dict[int, list[int]]:
    """Steps ``run.start`` to ``run.end``, checkpointing every ``checkpoint_every``; returns the examples each step
    drew on this process (``--log-data-order``; else empty)."""
    from tqdm.auto import tqdm

    spec, accelerator, ckpt = plan.spec, run.accelerator, plan.ckpt
    order = DataOrder(run.examples.n, spec.seed)
    rank = accelerator.process_index
    seen: dict[int, list[int]] = {}
    # The backbone's "" context, on the device once; every step passes it, batch-broadcast, to the frozen UNet,
    # whose cross-attention keys and values of it are then computed once (_constant_context_kv).
    backbone_context = run.encoded.empty_context.to(device=accelerator.device, dtype=run.weight_dtype)
    bar = tqdm(range(run.start, run.end), initial=run.start, total=spec.max_steps,
               desc=f"train {plan.code} ({plan.branch_type})", dynamic_ncols=True,
               disable=not (options.progress and accelerator.is_main_process))
    window: list[float] = []
    last_good = checkpoint_step(ckpt) if options.resume else None
    run.model.train()
    with _constant_context_kv(run.frozen.unet, backbone_context):
        for step in bar:
            t0 = time.perf_counter()
            step_loss, parts_sum = 0.0, {}
            for a in range(spec.gradient_accumulation_steps):
                positions = range(a * run.per_micro + rank * run.micro, a * run.per_micro + (rank + 1) * run.micro)
                indices = order.indices(step, spec.batch_size, positions)
                if options.log_data_order:
                    seen.setdefault(step, []).extend(indices)
                loss, parts = _accumulation_step(run, plan, step, indices, positions, backbone_context, last_good)
                step_loss += loss / spec.gradient_accumulation_steps
                for k, v in parts.items():
                    if k != "loss":
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / spec.gradient_accumulation_steps
            run.lr_scheduler.step()
            if run.ema is not None:
                _ema_update(run.ema, run.unwrapped, spec.ema_decay, step)
            run.losses.append([step + 1, round(step_loss, 6)])
            window = (window + [time.perf_counter() - t0])[-20:]
            rate = spec.batch_size * len(window) / sum(window)
            lr = run.lr_scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{rate:.1f}", lr=f"{lr:.1e}")
            if options.report_to != "none":
                accelerator.log({"loss": step_loss, "lr": lr, "samples_per_s": rate, **parts_sum}, step=step + 1)
            if (step + 1) % spec.checkpoint_every == 0 or step + 1 == run.end:
                _check_finite_weights(run, plan, step + 1, last_good)
                with _disk_full_says_what_is_kept(plan, ckpt, step + 1, last_good):
                    _save_training_state(accelerator, ckpt, _modules(run), step + 1, run.optimizer,
                                         run.lr_scheduler, {"settings": run.settings, "losses": run.losses})
                last_good = step + 1
            if callback is not None:
                callback(step + 1, step_loss, SimpleNamespace(branch=run.unwrapped, ema=run.ema, frozen=run.frozen))
    return seen


def _accumulation_step(run: _Run, plan: _Plan, step: int, indices: list[int], positions: range,
                       backbone_context: torch.Tensor, last_good: int | None) -> tuple[float, dict]:
    """One micro-batch: forward, backward, and (on the last of an accumulation) the optimizer step. A non-finite
    loss stops the run before the optimizer touches the weights, naming the last good checkpoint."""
    accelerator, spec, model = run.accelerator, plan.spec, run.model
    with accelerator.accumulate(model):
        with accelerator.autocast():
            parts = _step_loss(model, run.unwrapped, plan.branch_cls, run.frozen, run.encoded, indices, positions,
                               step, spec, run.weights, run.distil, accelerator.device, run.weight_dtype,
                               run.frozen.noise_scheduler.config.num_train_timesteps,
                               tuple(run.encoded.latents.shape[1:]), backbone_context)
        loss = accelerator.reduce(parts["loss"].detach().float().reshape(1), "mean").item()
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {plan.ckpt} (step {last_good})" if last_good else \
                "no checkpoint was written yet"
            raise TrainingError(f"{plan.code}: the loss is {loss} at step {step} (learning rate "
                                f"{run.lr_scheduler.get_last_lr()[0]:.2e}); stopped before the optimizer step, "
                                f"{where}, and {plan.out} is untouched; try a lower learning_rate or "
                                "mixed_precision no, then --resume")
        accelerator.backward(parts["loss"])
        if accelerator.sync_gradients and spec.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, parts


def _check_finite_weights(run: _Run, plan: _Plan, step: int, last_good: int | None) -> None:
    """Refuse to write a checkpoint or the branch whose weights (or EMA) hold NaN or inf: the last good checkpoint
    and the written branch stay as they are."""
    for name, module in (("branch", run.unwrapped), ("ema", run.ema)):
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                where = f"the last good checkpoint is {plan.ckpt} (step {last_good})" if last_good else \
                    "no checkpoint was written"
                raise TrainingError(f"{plan.code}: the {name} weights ({key}) are NaN or inf at step {step}; "
                                    f"nothing was written, {where}, and {plan.out} is untouched; lower the learning "
                                    "rate (branch.training.learning_rate, --lr)")


@contextmanager
def _disk_full_says_what_is_kept(plan: _Plan, path: Path, step: int, last_good: int | None) -> Iterator[None]:
    """A full disk (or quota) while writing ``path`` becomes one line that names it and says what is intact."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = f"the last checkpoint {plan.ckpt} (step {last_good}) is intact" if last_good else \
            "no checkpoint was written yet"
        raise TrainingError(f"{plan.code}: no space left on the device while writing {path} at step {step}; "
                            f"nothing half-written was left, {kept}; free space and run again with --resume") from None


def _finish(run: _Run, plan: _Plan, options: TrainOptions, seen: dict[int, list[int]], seconds: float) -> dict:
    """Write the branch (its EMA where kept) and ``train_info.json`` from the main process; return the info."""
    accelerator, spec = run.accelerator, plan.spec
    final = run.ema if run.ema is not None else run.unwrapped
    rank, processes = accelerator.process_index, accelerator.num_processes
    if options.log_data_order:
        atomic_write_text(plan.work / DATA_ORDER_DIR / f"rank{rank}.json", json.dumps(
            {"rank": rank, "num_processes": processes, "weights": weights_digest(final),
             "steps": {str(k): v for k, v in seen.items()}}))
    accelerator.wait_for_everyone()
    done = run.end - run.start
    info = {
        "language": plan.code, "branch_type": plan.branch_type, "out": str(plan.out), "work": str(plan.work),
        "steps": run.end, "max_steps": spec.max_steps, "resumed_from": run.start or None,
        "stopped_early": run.end < spec.max_steps, "processes": processes, "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision, "examples": run.examples.n,
        "seconds": round(seconds, 1), "samples_per_s": round(spec.batch_size * done / seconds, 2) if done else None,
        "final_loss": run.losses[-1][1] if run.losses else None, "ema": spec.ema, "settings": run.settings,
        "losses": run.losses, "command": " ".join(sys.argv),
    }
    if accelerator.is_main_process:
        _check_finite_weights(run, plan, run.end, checkpoint_step(plan.ckpt))
        with _disk_full_says_what_is_kept(plan, plan.out, run.end, checkpoint_step(plan.ckpt)):
            final.save_pretrained(plan.out, overwrite=True, torch_dtype=SAVE_DTYPES[options.save_dtype])
            mark_ours(plan.out)
        atomic_write_text(plan.work / INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n")
        run.say(f"{plan.code}: wrote the {plan.branch_type} branch to {plan.out} (step {run.end}, loss "
                f"{info['final_loss']}, {info['samples_per_s']} samples/s)")
    accelerator.wait_for_everyone()
    if options.report_to != "none":
        accelerator.end_training()
    return info


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _save_training_state(accelerator: Any, ckpt: Path, modules: dict[str, torch.nn.Module], step: int,
                         optimizer: Any, lr_scheduler: Any, extra: dict) -> None:
    """Write ``ckpt`` whole or not at all. Plain runs: the main process writes the weights (safetensors), the
    optimizer and the schedule (:func:`save_checkpoint`). DeepSpeed: every rank writes its optimizer partition
    (``accelerator.save_state``) into one temporary folder, which the main process then publishes."""
    accelerator.wait_for_everyone()
    if not _is_deepspeed(accelerator):
        if accelerator.is_main_process:
            save_checkpoint(ckpt, modules, step, optimizer, lr_scheduler, extra=extra)
        accelerator.wait_for_everyone()
        return
    from safetensors.torch import save_file

    from polybridge.atomic import publish_dir

    tmp = ckpt.parent / f".{ckpt.name}.tmp-step{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "deepspeed"))
    if accelerator.is_main_process:
        for name, module in modules.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                      str(tmp / f"{name}.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "lr_scheduler": lr_scheduler.state_dict(), **extra},
                                                 default=str), encoding="utf-8")
        publish_dir(tmp, ckpt)
    accelerator.wait_for_everyone()


def _load_training_state(accelerator: Any, ckpt: Path, modules: dict[str, torch.nn.Module], optimizer: Any,
                         lr_scheduler: Any) -> dict:
    if not _is_deepspeed(accelerator):
        return load_checkpoint(ckpt, modules, optimizer, lr_scheduler)
    from safetensors.torch import load_file

    accelerator.load_state(str(ckpt / "deepspeed"))  # the branch and every rank's optimizer partition
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    for name, module in modules.items():
        if name != "branch":
            module.load_state_dict(load_file(str(ckpt / f"{name}.safetensors")))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state


def _configure_deepspeed(accelerator: Any, micro: int, spec: TrainingSpec) -> None:
    if not _is_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro
    if spec.max_grad_norm > 0 and config.get("gradient_clipping") in (None, "auto"):
        config["gradient_clipping"] = spec.max_grad_norm


@contextmanager
def _constant_context_kv(unet: torch.nn.Module, context: torch.Tensor) -> Iterator[None]:
    """While open, the frozen ``unet``'s cross-attention key and value projections compute ``context`` (``(1, L, C)``)
    once and hand it out batch-broadcast whenever they are given ``context.expand(batch, -1, -1)``, the backbone's
    ``""`` context of every step; any other input goes through the Linear as always. A Linear is the same function
    of each row, so this is the same computation up to float rounding; gradients are unaffected (the projections
    are frozen and ``context`` is a constant). The modules' ``forward`` is patched on the instance (their weights
    and state dict do not change) and restored on exit."""
    from diffusers.models.attention_processor import Attention

    patched: list[torch.nn.Module] = []
    if context.dim() == 3 and context.shape[0] == 1:
        for module in unet.modules():
            if not (isinstance(module, Attention) and module.is_cross_attention):
                continue
            for linear in (module.to_k, module.to_v):
                if (type(linear) is torch.nn.Linear and "forward" not in linear.__dict__  # none hooked by accelerate
                        and not any(p.requires_grad for p in linear.parameters())):
                    linear.forward = _constant_input_forward(linear, context)
                    patched.append(linear)
    try:
        yield
    finally:
        for linear in patched:
            del linear.forward  # the class's forward again


def _constant_input_forward(linear: torch.nn.Linear, base: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    plain = type(linear).forward
    cache: dict[tuple, torch.Tensor] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (x.dim() == 3 and x.data_ptr() == base.data_ptr() and x.shape[1:] == base.shape[1:]
                and x.stride()[1:] == base.stride()[1:] and (x.shape[0] == 1 or x.stride(0) == 0)
                and x.dtype == base.dtype and x.device == base.device):
            return plain(linear, x)
        device_type = x.device.type
        key = (linear.weight._version, torch.is_autocast_enabled(device_type),
               torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)
        if key not in cache:
            cache.clear()
            with torch.no_grad():
                cache[key] = plain(linear, base)
        return cache[key].expand(x.shape[0], -1, -1)

    return forward


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, pl in zip(ema.parameters(), live.parameters()):
        pe.lerp_(pl.detach().to(pe.dtype), 1 - d)


def _step_loss(model: Any, unwrapped: Any, branch_cls: Any, frozen: _Frozen, encoded: EncodedExamples,
               indices: list[int], positions: range, step: int, spec: TrainingSpec, weights: dict, distil: bool,
               device: Any, weight_dtype: torch.dtype, num_timesteps: int,
               latent_shape: tuple[int, ...], backbone_context: torch.Tensor) -> dict[str, torch.Tensor]:
    timesteps, noise, drops = sample_draws(spec.seed, step, positions, num_timesteps, spec.caption_dropout,
                                           latent_shape)
    idx = torch.tensor(indices, dtype=torch.long)
    latents = encoded.latents[idx].to(device=device, dtype=torch.float32)
    noise = noise.to(device)
    timesteps = timesteps.to(device)
    states = encoded.states[idx]  # advanced indexing copies
    chunks = encoded.chunks[idx]
    drop = torch.tensor(drops, dtype=torch.bool)
    if drop.any():
        n_chunks = states.shape[1] // encoded.chunk_length
        states[drop] = encoded.empty_states.repeat(1, n_chunks, 1).to(states.dtype)
        chunks[drop] = 1
    most = int(chunks.max())
    states = states[:, :most * encoded.chunk_length]
    mask = None
    if bool((chunks < most).any()):
        mask = (torch.arange(most).repeat_interleave(encoded.chunk_length)[None, :] < chunks[:, None]).long().to(device)
    sched = frozen.noise_scheduler
    noisy = sched.add_noise(latents, noise, timesteps)
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise TrainingError(f"prediction_type {sched.config.prediction_type!r} of the backbone's scheduler is not "
                            "supported; valid: epsilon, v_prediction")
    branch_dtype = next(unwrapped.parameters()).dtype
    rows = len(indices)
    family = get_family(frozen.backbone.family)
    vae_scale = 2 ** (len(frozen.vae.config.block_out_channels) - 1)
    size = family.size_conditioning(frozen.backbone, rows, latent_shape[-2] * vae_scale, latent_shape[-1] * vae_scale,
                                    device, weight_dtype)
    # The backbone reads "" (BDM): a default that a branch giving its own context (pea) replaces.
    backbone = Conditioning(context=backbone_context.expand(rows, -1, -1), optional=True, added={
        k: v.to(device=device, dtype=weight_dtype).expand(rows, *v.shape[1:]) for k, v in encoded.empty_added.items()})
    added = compose([backbone, size], rows).added
    branch = unwrapped.condition(states.to(device=device, dtype=branch_dtype), mask, sample=noisy.to(branch_dtype),
                                 timestep=timesteps, added={k: v.to(branch_dtype) for k, v in added.items()} or None,
                                 call=model)
    student = compose([branch.to(weight_dtype), backbone, size], rows).unet_kwargs()
    teacher, parallel_rows = None, None
    if distil:
        assert encoded.english is not None
        eng = encoded.english[idx]
        eng_added = {k: v[idx] for k, v in encoded.english_added.items()}
        if drop.any():
            eng[drop] = encoded.empty_context.to(eng.dtype)
            for k, v in eng_added.items():
                v[drop] = encoded.empty_added[k].to(v.dtype)
        english = Conditioning(context=eng.to(device=device, dtype=weight_dtype),
                               added={k: v.to(device=device, dtype=weight_dtype) for k, v in eng_added.items()})
        teacher = compose([english, size], rows).unet_kwargs()
        if encoded.parallel is not None:
            # a dropped caption is "" for teacher and student alike: a parallel pair
            parallel_rows = ((encoded.parallel[idx] > 0) | drop).to(device)
    sample_weights = None
    if spec.snr_gamma is not None:
        snr = timestep_snr(sched.alphas_cumprod, timesteps)
        sample_weights = min_snr_weights(snr, spec.snr_gamma, sched.config.prediction_type)
    return branch_cls.training_loss(frozen.unet, noisy.to(weight_dtype), timesteps, target, student, teacher, weights,
                                    sample_weights, parallel=parallel_rows)


def _encodings(examples: Examples, frozen: _Frozen, accelerator: Any, work: Path, settings: dict,
               spec: TrainingSpec, options: TrainOptions, dtype: torch.dtype,
               say: Callable[[str], None]) -> EncodedExamples:
    """Every example's frozen encodings: read from ``<work>/cache`` when it was made from the same data and
    weights, else computed (each process a shard, then gathered) and written there.

    The latents depend only on the images and the VAE, not on the language: languages trained on the same
    scenes (the synthetic world gives every language the same scenes for the same seed and ``data.objects: all``)
    share them through ``<work>/../latents/<key>.safetensors``, so only the first run of a backbone pays for the
    VAE; with ``objects: own`` each language's scenes, and so its latents, are its own."""
    from safetensors.torch import load_file, save, save_file

    english = examples.english is not None
    vae_digest = weights_digest(frozen.vae)
    key = cache_key({"data": settings["data"], "encoder": settings["encoder"],
                     "encoder_weights": weights_digest(frozen.encoder.model), "vae": vae_digest,
                     "text_encoder": weights_digest(*frozen.backbone.frozen_modules()[2:]) if english else None,
                     "english": english, "dtype": str(dtype), "max_length": frozen.encoder.max_length,
                     "hidden_layer": frozen.encoder.hidden_layer})
    if examples.stream is not None:  # a dataset: encoded into shards as it is read, then read memory-mapped
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"encode {settings['language']} (frozen, once)", dynamic_ncols=True,
                   disable=not (options.progress and accelerator.is_main_process))
        encoded = sharded_encodings(examples, work / "encoded" / key, key, rank=accelerator.process_index,
                                    world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                                    vae=frozen.vae, encoder=frozen.encoder, backbone=frozen.backbone,
                                    device=accelerator.device, dtype=dtype, batch_size=options.cache_batch, log=say,
                                    progress=bar.update)
        bar.close()
        return encoded
    images = {k: v for k, v in settings["data"].items() if k not in ("caption_column", "english_column", "native_only")}
    latent_key = cache_key({"images": images, "vae": vae_digest, "dtype": str(dtype)})
    file = work / CACHE_DIR / CACHE_FILE
    latent_file = work.parent / LATENT_DIR / f"{latent_key}.safetensors"
    usable = _agree(accelerator, _cache_key_of(file) == key)
    if usable:
        say(f"{settings['language']}: reading cached encodings from {file}")
        return EncodedExamples.from_tensors(load_file(str(file)))
    shared = _agree(accelerator, _cache_key_of(latent_file) == latent_key)
    device, n = accelerator.device, examples.n
    max_chunks = max(chunk_counts(frozen.encoder, examples.captions))
    per = -(-n // accelerator.num_processes)
    lo, hi = accelerator.process_index * per, min(n, (accelerator.process_index + 1) * per)
    from tqdm.auto import tqdm

    what = "text" if shared else "images and text"
    bar = tqdm(total=n, desc=f"encode {settings['language']} {what} (frozen, once)", dynamic_ncols=True,
               disable=not (options.progress and accelerator.is_main_process))
    shard = encode_examples(examples, range(lo, hi), vae=None if shared else frozen.vae, encoder=frozen.encoder,
                            backbone=frozen.backbone, max_chunks=max_chunks,
                            english=english, device=device, dtype=dtype, batch_size=options.cache_batch,
                            progress=lambda k: bar.update(k * accelerator.num_processes))
    bar.close()
    tensors = {k: _gather_rows(accelerator, v, per)[:n] for k, v in shard.items()} if accelerator.num_processes > 1 \
        else shard
    if shared:
        say(f"{settings['language']}: latents read from the shared cache {latent_file}")
        tensors["latents"] = load_file(str(latent_file))["latents"]
    with torch.no_grad():
        tensors["empty_states"] = frozen.encoder.encode([""]).to(dtype).cpu()
        empty = encode_backbone_text(frozen.backbone, [""], device)
        tensors["empty_context"] = empty.context.to(dtype).cpu()
        tensors.update({f"empty_added.{k}": v.to(dtype).cpu() for k, v in empty.added.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if accelerator.is_local_main_process:
        with atomic_dir(file.parent, overwrite=True) as tmp:
            save_file(tensors, str(tmp / CACHE_FILE), metadata={"key": key})
        if not shared:
            atomic_write_bytes(latent_file, save({"latents": tensors["latents"]}, metadata={"key": latent_key}))
    accelerator.wait_for_everyone()
    return EncodedExamples.from_tensors(tensors)


def _cache_key_of(file: Path) -> str | None:
    """The key a cache file was written with (None when it is missing or unreadable: it is then rebuilt)."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as fh:
            return (fh.metadata() or {}).get("key")
    except Exception:
        return None


def _agree(accelerator: Any, ok: bool) -> bool:
    """One decision for all processes: true only where every process says so (a machine without the file
    makes everyone encode)."""
    if accelerator.num_processes > 1:
        flag = torch.tensor([1 if ok else 0], device=accelerator.device)
        return bool(accelerator.gather(flag).min().item())
    return ok


def _gather_rows(accelerator: Any, tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Every process's ``tensor`` (at most ``rows`` rows each), concatenated in rank order."""
    padded = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[:tensor.shape[0]] = tensor
    return accelerator.gather(padded.to(accelerator.device)).cpu()


def languages_to_train(registry: Registry) -> list[str]:
    """``--all``: every language with a branch entry whose local weights do not exist yet."""
    return [code for code, entry in registry.languages.items()
            if entry.branch is not None and entry.status()["branch"] == "missing"]
