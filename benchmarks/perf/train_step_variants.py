"""Ways to make a branch-training step cheaper, measured side by side on the same step.

    python benchmarks/perf/train_step_variants.py                       # plain, channels_last, bf16 autocast
    python benchmarks/perf/train_step_variants.py --variants plain compile   # torch.compile: minutes to compile
    python benchmarks/perf/train_step_variants.py --attention           # the attention kernels on the UNet's shapes

The step is what the trainer runs once its encodings are cached (``train_throughput.py`` compares that with a loop
that encodes every step): the branch's forward, the frozen UNet's forward with the branch's output, the MSE, the
backward, gradient clipping and a fused AdamW step, on random latents and native token states. Each variant gets its
own copy of the same branch (and of the UNet where it changes it), and the variants take turns (``--rounds``), so a
change in the machine's load falls on all of them alike; the table gives each one's median step time and its ratio
to ``plain``.

- ``plain``: the models as the trainer runs them (fp32, contiguous NCHW tensors).
- ``channels_last``: branch, UNet and latents in the channels-last memory format.
- ``bf16``: as the trainer's ``mixed_precision: bf16``: the frozen UNet cast to bfloat16, the branch in fp32, the
  forward under ``torch.autocast(dtype=bfloat16)``.
- ``compile``: the forward (branch, UNet, loss) through ``torch.compile``; its compile time is printed apart.

Default backbone: the embedded default's architecture with random weights (as ``train_throughput.py``); timing does
not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("plain", "channels_last", "bf16", "compile")


def _step_fn(variant: str, branch: torch.nn.Module, unet: torch.nn.Module, states: torch.Tensor,
             context: torch.Tensor, timesteps: torch.Tensor):
    from polybridge.conditioning import Conditioning, compose

    branch = copy.deepcopy(branch)
    if variant == "channels_last":
        branch = branch.to(memory_format=torch.channels_last)
        unet = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    # bf16 as the trainer runs it: the frozen UNet (and its context) in bf16, the branch in fp32 under autocast
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    if variant == "bf16":
        unet, context = copy.deepcopy(unet).to(dtype), context.to(dtype)
    optimizer = torch.optim.AdamW(branch.parameters(), lr=1e-4, fused=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            own = branch.condition(states, sample=x, timestep=timesteps).to(dtype)
            inputs = compose([own, Conditioning(context=context, optional=True)], x.shape[0]).unet_kwargs()
            pred = unet(x.to(dtype), timesteps, **inputs).sample
        return F.mse_loss(pred.float(), x.float())

    if variant == "compile":
        forward = torch.compile(forward)

    def step(x: torch.Tensor) -> None:
        forward(x).backward()
        torch.nn.utils.clip_grad_norm_(branch.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_steps(args) -> list[dict]:
    from polybridge.backbones import load_backbone
    from polybridge.branches import get_branch_class
    from polybridge.encoders import load_encoder
    from polybridge.registry import load_registry
    from train_throughput import make_registry

    with tempfile.TemporaryDirectory(prefix="pb-step-") as tmp:
        (Path(tmp) / "registry").mkdir()
        registry = load_registry(make_registry(Path(tmp) / "registry", args.lang, None, False))
        entry = registry.language(args.lang)
        bb = load_backbone(registry)
        encoder = load_encoder(entry)
    unet = bb.unet.requires_grad_(False)
    torch.manual_seed(0)
    branch = get_branch_class("bdm").from_unet(unet, encoder.hidden_size, encoder_name=entry.encoder.source,
                                                 **dict(entry.branch.options))
    side = unet.config.sample_size
    latents = torch.randn(args.batch_size, unet.config.in_channels, side, side)
    states = torch.randn(args.batch_size, encoder.max_length, encoder.hidden_size)
    context = torch.randn(1, bb.tokenizer.model_max_length, unet.config.cross_attention_dim)
    context = context.expand(args.batch_size, -1, -1)
    timesteps = torch.randint(0, 1000, (args.batch_size,))
    steps, inputs, times, setup = {}, {}, {}, {}
    for variant in args.variants:
        steps[variant] = _step_fn(variant, branch, unet, states, context, timesteps)
        inputs[variant] = latents.to(memory_format=torch.channels_last) if variant == "channels_last" else latents
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steps[variant](inputs[variant])
        setup[variant] = time.perf_counter() - t0
        times[variant] = []
    for _ in range(args.rounds):
        for variant in args.variants:
            t0 = time.perf_counter()
            steps[variant](inputs[variant])
            times[variant].append(time.perf_counter() - t0)
    base = statistics.median(times[args.variants[0]])
    return [{"variant": v, "step_ms": 1000 * statistics.median(times[v]),
             "ratio": base / statistics.median(times[v]), "warmup_s": setup[v]} for v in args.variants]


def measure_attention(batch: int, rounds: int) -> list[dict]:
    """Forward and backward of one attention call, on the tiny UNet's shapes (8-wide heads), three kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def matmul_softmax(q, k, v):
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    rows = []
    for name, (heads, lq, lk) in {"self, 8x8 latent": (8, 64, 64), "self, 4x4 latent": (16, 16, 16),
                                  "cross, 8x8 latent, 48 tokens": (8, 64, 48)}.items():
        q, k, v = (torch.randn(batch, heads, n, 8, requires_grad=True) for n in (lq, lk, lk))
        row = {"shape": name}
        for kernel, fn in (("flash", flash), ("math", math), ("matmul_softmax", matmul_softmax)):
            for _ in range(3):
                fn(q, k, v).sum().backward()
            t0 = time.perf_counter()
            for _ in range(rounds):
                fn(q, k, v).sum().backward()
            row[kernel] = 1000 * (time.perf_counter() - t0) / rounds
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lang", default="zh", help="language whose committed encoder is used (default zh)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["plain", "channels_last", "bf16"],
                        help="variants, the first is the reference (default: plain channels_last bf16)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant, taken in turns (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--attention", action="store_true", help="time the attention kernels instead")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        parser.error("--rounds and --warmup must be at least 1")
    torch.set_num_threads(args.threads)
    if args.attention:
        print(f"attention forward+backward, batch {args.batch_size}, 8-wide heads, {args.threads} thread(s), ms:")
        print(f"  {'shape':<30} {'flash':>8} {'math':>8} {'matmul+softmax':>15}")
        for row in measure_attention(args.batch_size, args.rounds):
            print(f"  {row['shape']:<30} {row['flash']:>8.2f} {row['math']:>8.2f} {row['matmul_softmax']:>15.2f}")
        return 0
    import transformers

    transformers.utils.logging.disable_progress_bar()
    rows = measure_steps(args)
    print(f"bdm step of the embedded default's architecture, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.rounds} steps per variant, taken in turns:")
    for row in rows:
        print(f"  {row['variant']:<14} {row['step_ms']:>8.1f} ms  {row['ratio']:.2f}x of {rows[0]['variant']}  "
              f"(first {args.warmup} steps: {row['warmup_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
