#!/usr/bin/env python
"""Train the ground-truth scorer on freshly rendered scenes and write its weights.

    python scripts/build_scorer.py                      # default weights → polybridge/assets/scorer/
    python scripts/build_scorer.py --steps 500 --out /tmp/scorer

Training scenes come from the "train" split, which never contains the held-out (object, colour)
pairs; the final evaluation uses fresh "test" scenes, which do, so the reported accuracy also
says whether the scorer generalises to combinations it never saw. Every batch is rendered on the
fly (no scene is seen twice), and about half of each batch is lightly degraded (noise, blur,
brightness) so that the scorer also reads the slightly soft images a small diffusion model makes.
The output folder is replaced atomically, and only if training finished.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

try:
    import polybridge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polybridge.synthetic.render import render_scene
from polybridge.synthetic.scenes import sample_scenes
from polybridge.synthetic.scorer import DEFAULT_SCORER_DIR, SceneScorer, scene_targets, scorer_loss

ATTRIBUTES = ("background", "shape", "colour", "size", "position", "shape_generic", "shape_concept", "scene")


def render_batch(scenes, size: int) -> torch.Tensor:
    arr = np.stack([np.asarray(render_scene(s, size), dtype=np.uint8) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def augment(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Noise, blur and brightness on a random ``p`` of the batch; the rest stays clean."""
    b = x.shape[0]
    pick = torch.rand(b, generator=gen) < p
    if not pick.any():
        return x
    y = x[pick]
    n = y.shape[0]
    # Blur: a per-image 3x3 Gaussian, sigma in [0, 0.8] (0 = none), as one grouped convolution.
    sigma = torch.rand(n, generator=gen) * 0.8 * (torch.rand(n, generator=gen) < 0.6)
    t = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # [n*3, 1, 3, 3]
    y = torch.nn.functional.conv2d(
        torch.nn.functional.pad(y.reshape(1, n * 3, *y.shape[2:]), (1, 1, 1, 1), mode="replicate"), k2, groups=n * 3
    ).reshape_as(y)
    # Brightness (per image) and a slight per-channel tint, then Gaussian noise.
    y = y * (1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.16)
    y = y * (1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.06)
    y = y + torch.randn(y.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.04)
    x = x.clone()
    x[pick] = y.clamp(0, 1)
    return x


@torch.no_grad()
def evaluate(model: SceneScorer, n: int, seed: int, split: str, size: int) -> dict:
    scenes = sample_scenes(n, seed, split)
    x = render_batch(scenes, size)
    return model.score(x, scenes)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, x: torch.Tensor, targets: dict) -> float:
    """One optimiser and schedule step on the batch ``x``; returns its loss."""
    loss = scorer_loss(model(x), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def format_metrics(m: dict) -> str:
    return " ".join(f"{k}={m[k]:.4f}" for k in ATTRIBUTES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="seeds the scene streams, the init and the augmentation (default 0)")
    ap.add_argument("--steps", type=int, default=1600, help="optimiser steps (default 1600)")
    ap.add_argument("--batch", type=int, default=128, help="scenes per step (default 128)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default 3e-3)")
    ap.add_argument("--size", type=int, default=32, help="image size the scorer reads (default 32)")
    ap.add_argument("--eval-n", type=int, default=2000, help="fresh test-split scenes for the final evaluation (default 2000)")
    ap.add_argument("--out", type=Path, default=DEFAULT_SCORER_DIR, help=f"output folder (default {DEFAULT_SCORER_DIR})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine a second thread fighting for a busy core makes each step ~5x slower)")
    ap.add_argument("--eval-every", type=int, default=400, help="steps between validation checks (default 400)")
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.batch <= 0 or args.eval_n <= 0:
        ap.error("--steps, --batch and --eval-n must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = SceneScorer(args.size).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"scorer: {n_params:,} parameters, {args.steps} steps of {args.batch} scenes at {args.size}px", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)

    start = time.time()
    model.train()
    running = None
    bar = tqdm(range(args.steps), desc="scorer", file=sys.stdout, mininterval=5, dynamic_ncols=False, ncols=100)
    for step in bar:
        scenes = sample_scenes(args.batch, args.seed, "train", start=step * args.batch)
        targets = scene_targets(scenes)
        x = augment(render_batch(scenes, args.size), gen).contiguous(memory_format=torch.channels_last)
        loss = train_step(model, opt, sched, x, targets)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            m = evaluate(model, 500, args.seed, "validation", args.size)
            model.train()
            tqdm.write(f"step {step + 1}: validation {format_metrics(m)}", file=sys.stdout)
    train_s = time.time() - start

    model.eval()
    metrics = evaluate(model, args.eval_n, args.seed, "test", args.size)
    print(f"trained in {train_s / 60:.1f} min")
    print(f"test split, {args.eval_n} fresh scenes (held-out pairs included):")
    for k in ATTRIBUTES:
        print(f"  {k:14s} {metrics[k]:.4f}")
    worst = sorted(metrics["per_concept"].items(), key=lambda kv: kv[1])[:5]
    print("  weakest concepts: " + ", ".join(f"{k} {v:.3f}" for k, v in worst))
    record = {
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "train_minutes": round(train_s / 60, 2),
        "eval": {"split": "test", "n": args.eval_n, "seed": args.seed,
                 **{k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}},
    }
    model.save_pretrained(args.out, metrics=record)
    print(f"wrote {args.out}")
    failing = [k for k in ATTRIBUTES[:7] if metrics[k] < 0.98]
    if failing:
        print(f"warning: below 0.98 on {failing}", file=sys.stderr)
    print(json.dumps({k: round(metrics[k], 4) for k in ATTRIBUTES}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
