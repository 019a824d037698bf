"""Train the embedded default's native text encoders (and the synthetic world's English CLIP).

    python scripts/build_encoders.py                       # every registry language with an encoder
    python scripts/build_encoders.py --langs zh ja         # just these
    python scripts/build_encoders.py --world-clip          # also the English world CLIP (polybridge/assets/world-clip)
    python scripts/build_encoders.py --langs zh --smoke --work /tmp/enc --out-root /tmp/enc-out   # a 3-step toy run

Each language checkpoints into --work/<code>; run the same command again after a kill and it continues.
Each encoder is written (atomically) into its registry entry's encoder folder (languages/<code>/encoder),
or into --out-root/<code> when given. See polybridge/embedded/native_encoders.py for what is trained and why.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--langs", nargs="+", default=None,
                        help="language codes (default: every registry language with an encoder)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per language (default: the config's, 700)")
    parser.add_argument("--world-clip", action="store_true",
                        help="also build the English world CLIP (the backbone language's, for CLIPScore / FID)")
    parser.add_argument("--world-clip-only", action="store_true", help="build only the English world CLIP")
    parser.add_argument("--world-clip-steps", type=int, default=None, help="its steps (default: --steps)")
    parser.add_argument("--world-clip-out", type=Path, default=None,
                        help="where the world CLIP goes (default: polybridge/assets/world-clip)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and 3 steps (for CI)")
    parser.add_argument("--work", type=Path, default=REPO / "runs/native_encoders",
                        help="checkpoints, one folder per language (default: runs/native_encoders)")
    parser.add_argument("--out-root", type=Path, default=None,
                        help="write <out-root>/<code> instead of each entry's encoder folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--registry", default=None, help="registry.yaml (default: the repository's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    args = parser.parse_args(argv)

    from polybridge.registry import load_registry
    from polybridge.embedded import native_encoders as N
    from polybridge.embedded.world_clip import WORLD_CLIP_DIR, build_world_clip

    torch.set_num_threads(max(1, args.threads))
    registry = load_registry(args.registry or REPO)
    cfg = N.NativeEncoderConfig.smoke() if args.smoke else N.NativeEncoderConfig()
    cfg = replace(cfg, seed=args.seed)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    with_encoder = [c for c in registry.codes if registry.language(c).encoder is not None]
    langs = [] if args.world_clip_only else (args.langs or with_encoder)
    bad = [c for c in langs if c not in registry.languages or registry.language(c).encoder is None]
    if bad:
        print(f"error: --langs {' '.join(bad)}: not registry languages with an encoder; valid: {' '.join(with_encoder)}",
              file=sys.stderr)
        return 2
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + (argv if argv is not None else sys.argv[1:]))
    results: dict[str, dict] = {}
    started = time.time()
    for code in langs:
        entry = registry.language(code)
        out = args.out_root / code if args.out_root else entry.encoder_source
        if not isinstance(out, Path):
            print(f"{code}: encoder.source is a hub id ({out}); nothing to build (give --out-root to build one anyway)")
            continue
        t0, c0 = time.time(), time.process_time()
        info = N.train_native_encoder(registry, code, out, args.work / code, cfg, command=command,
                                      progress=not args.no_progress)
        results[code] = _report(code, out, info, time.time() - t0, time.process_time() - c0)
    if args.world_clip or args.world_clip_only:
        code = registry.backbone().language
        wcfg = replace(cfg, steps=args.world_clip_steps) if args.world_clip_steps else cfg
        out = args.world_clip_out or (args.out_root / "world-clip" if args.out_root else WORLD_CLIP_DIR)
        t0, c0 = time.time(), time.process_time()
        info = build_world_clip(registry, out, args.work / f"world-clip-{code}", wcfg, command=command,
                                  progress=not args.no_progress)
        results[f"world-clip ({code})"] = _report(f"world-clip ({code})", out, info, time.time() - t0,
                                                  time.process_time() - c0)
    print(f"done in {time.time() - started:.0f}s")
    print(json.dumps(results, indent=2))
    return 0


def _report(name: str, out: Path, info: dict, wall: float, cpu: float) -> dict:
    from polybridge.embedded.native_encoders import encoder_size_bytes

    m = info["metrics"]
    row = {
        "out": str(out),
        "steps": info["steps"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "encoder_bytes": encoder_size_bytes(out),
        "retrieval_top1": m["retrieval_top1"],
        "retrieval_top1_heldout": m["retrieval_top1_heldout"],
        "pooled_probe": m["text_probe"],
        "token_probe": m["token_probe"],
    }
    tp, kp = m["text_probe"], m["token_probe"]
    print(f"{name}: {info['steps']} steps, {wall:.0f}s wall / {cpu:.0f}s cpu, {row['encoder_bytes'] / 1e6:.2f} MB; "
          f"test retrieval top-1 (of {m['retrieval_batch']}) {m['retrieval_top1']:.3f} "
          f"(held-out {m['retrieval_top1_heldout']:.3f}); pooled probe: bg {tp['background']:.3f} shape {tp['shape']:.3f} "
          f"colour {tp['colour']:.3f} size {tp['size']:.3f} scene {tp['scene']:.3f}; token probe: shape {kp['shape']:.3f} "
          f"colour {kp['colour']:.3f} scene {kp['scene']:.3f} (held-out scene {kp.get('heldout_scene', float('nan')):.3f})",
          flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
