"""``polybridge train``: a language's branch, from its registry entry."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from polybridge import limits
from polybridge.cli.common import CommandError, float_in, int_upto, positive_int, print_json, registry_of
from polybridge.registry import DATA_OBJECTS


def _branch_options(pairs: list[str]) -> dict[str, Any]:
    """``["hidden_size=768", "bias=true"]`` -> ``{"hidden_size": 768, "bias": True}`` (values read as YAML)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--branch-option {pair!r}: write KEY=VALUE, e.g. hidden_size=768")
        options[key.strip()] = yaml.safe_load(value)
    return options


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from polybridge.training.trainer import TrainOptions, languages_to_train, train_language

    reg = registry_of(args)
    if args.all:
        if args.out is not None or args.init_from is not None:
            raise CommandError("--out and --init-from name one branch; use them with --lang, not --all")
        codes = languages_to_train(reg)
        if not codes:
            print("every language with a branch entry already has its weights; nothing to train")
            return 0
    else:
        entry = reg.language(args.lang)
        if entry.branch is None:
            raise CommandError(f"{entry.file}: {args.lang!r} is the backbone's language: it has no branch to train")
        codes = [args.lang]
    if args.work is not None and len(codes) > 1:
        raise CommandError("--work names one run's folder; use it with --lang, not --all")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = TrainOptions(
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup,
        lr_schedule=args.lr_schedule, gradient_accumulation_steps=args.grad_accum, caption_dropout=args.caption_dropout,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing, ema=args.ema,
        checkpoint_every=args.checkpoint_every, seed=args.seed, snr_gamma=args.snr_gamma, num_samples=args.num_samples,
        objects=args.objects,
        branch_type=args.branch_type, branch_options=_branch_options(args.branch_option), backbone=args.backbone,
        work_dir=args.work, out_dir=args.out, init_from=args.init_from, resume=args.resume, overwrite=args.overwrite,
        report_to=args.report_to,
        stop_at=args.stop_at, progress=not args.no_progress, log_data_order=args.log_data_order,
        save_dtype=args.save_dtype,
    )
    results = []
    for code in codes:
        info = train_language(reg, code, options, log=lambda msg: print(msg, file=sys.stderr))
        results.append({k: v for k, v in info.items() if k not in ("losses", "settings")})
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        print_json(results if args.all else results[0])
    return 0


def add_commands(sub: Any) -> None:
    """``train``."""
    p = sub.add_parser("train", help="train a language's branch from its registry entry (bdm or pea)",
                       description="Train the branch of a language as its registry entry says (encoder, branch type, "
                                   "data, branch.training hyperparameters); flags override the entry. The branch is "
                                   "written where branch.weights points, atomically, when training ends. Runs as it "
                                   "is on one device or under `accelerate launch -m polybridge.cli train ...` "
                                   "(configs in scripts/accelerate/). Checkpoints go to --work; --resume continues "
                                   "after a kill with the same batches.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--lang", help="language code (see `polybridge registry list`)")
    group.add_argument("--all", action="store_true", help="every language whose branch weights do not exist yet")
    p.add_argument("--steps", type=int_upto(limits.MAX_TRAIN_STEPS), default=None,
                   help="optimizer steps (entry: branch.training.max_steps)")
    p.add_argument("--batch-size", type=int_upto(limits.MAX_BATCH_SIZE), default=None,
                   help="global batch per optimizer step, all processes together (entry: batch_size)")
    p.add_argument("--lr", type=float_in(0, limits.MAX_LEARNING_RATE), default=None,
                   help="learning rate (entry: learning_rate)")
    p.add_argument("--warmup", type=int_upto(limits.MAX_TRAIN_STEPS, low=0), default=None,
                   help="warmup steps (entry: warmup_steps)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None, help="(entry: lr_schedule)")
    p.add_argument("--grad-accum", type=int_upto(limits.MAX_BATCH_SIZE), default=None,
                   help="gradient accumulation steps (entry: gradient_accumulation_steps)")
    p.add_argument("--caption-dropout", type=float_in(0, 0.999), default=None,
                   help="share of empty captions (entry: caption_dropout)")
    p.add_argument("--snr-gamma", type=float_in(1e-6, 1e6), default=None,
                   help="min-SNR-gamma weighting of the denoising loss, e.g. 5.0 (entry: snr_gamma; null: plain MSE)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="(entry: mixed_precision; fp16 falls back to fp32 on a CPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (entry: gradient_checkpointing)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="keep and write an EMA of the weights (entry: ema, ema_decay)")
    p.add_argument("--checkpoint-every", type=int_upto(limits.MAX_TRAIN_STEPS), default=None,
                   help="(entry: checkpoint_every)")
    p.add_argument("--seed", type=int, default=None, help="seed of the data, noise and init (entry: seed)")
    p.add_argument("--num-samples", type=int_upto(limits.MAX_NUM_SAMPLES), default=None,
                   help="training examples (entry: data.num_samples)")
    p.add_argument("--objects", choices=DATA_OBJECTS, default=None,
                   help="synthetic data: scenes draw every object (all; another language's concept is an unnamed "
                        "'object') or the generic shapes plus the language's own concepts (own) (entry: data.objects)")
    p.add_argument("--branch-type", default=None, help="train another branch type than the entry's (bdm, pea); "
                                                       "give --out too")
    p.add_argument("--branch-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a branch option, over the entry's branch.options (which apply to the entry's own type "
                        "only); repeatable, e.g. --branch-option hidden_size=768 (pea: hidden_size, num_layers, bias)")
    p.add_argument("--backbone", default=None, help="backbone name in registry.yaml (default: default_backbone)")
    p.add_argument("--out", type=Path, default=None, help="where the branch goes (default: the entry's branch.weights)")
    p.add_argument("--work", type=Path, default=None,
                   help="checkpoints, encodings cache and train_info.json (default: runs/train/CODE-TYPE next to "
                        "registry.yaml)")
    p.add_argument("--init-from", type=Path, default=None, help="start from this saved branch instead of a fresh one")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing branch weights when training ends; without --resume, drop an old checkpoint")
    p.add_argument("--stop-at", type=int_upto(limits.MAX_TRAIN_STEPS), default=None,
                   help="end at this step on the full schedule and write the branch (resumable to max_steps)")
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype the written branch is stored in (float16 halves the file; it loads as float32)")
    p.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                   help="accelerate tracker (default none; tensorboard logs go to WORK/logs)")
    p.add_argument("--log-data-order", action="store_true",
                   help="write WORK/data_order/rankN.json: the examples each process saw per step")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.add_argument("--json", action="store_true", help="print what was trained as JSON")
    p.set_defaults(func=cmd_train)
