#!/usr/bin/env python
"""Build the toy plugins the plugin benchmark applies, on the embedded backbone, English side only.

    python scripts/build_toy_plugins.py                          # every toy plugin → polybridge/assets/plugins/
    python scripts/build_toy_plugins.py --plugins outline-lora --steps 50 --out-dir /tmp/plugins   # a smoke build

Each build is seeded and resumable (``--work``: the encoded scenes and a checkpoint every 200 steps; run the same
command again to continue). What each plugin is: ``polybridge/embedded/toy_plugins.py``. Each output folder gets a
README.md with the command, the steps, the final loss and the time it took.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

try:
    import polybridge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from polybridge.embedded.toy_plugins import (  # noqa: E402
    TOY_PLUGIN_DIR,
    TOY_PLUGINS,
    ToyTrainConfig,
    build_toy_plugin,
    toy_plugin,
)
from polybridge.errors import PolyBridgeError  # noqa: E402

DESCRIPTIONS = {
    "lora": "a style LoRA (diffusers/peft `pytorch_lora_weights.safetensors`, fp16)",
    "controlnet": "a ControlNet (diffusers `ControlNetModel` folder, fp16) reading a box layout map",
    "textual_inversion": "a Textual Inversion embedding (diffusers' one-key safetensors, fp16)",
    "checkpoint": "a fine-tune of the whole backbone UNet (a diffusers folder, fp16)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugins", nargs="+", default=[p.name for p in TOY_PLUGINS],
                        help=f"which (default all: {', '.join(p.name for p in TOY_PLUGINS)})")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {ToyTrainConfig.steps})")
    parser.add_argument("--out-dir", default=str(TOY_PLUGIN_DIR), help="where the plugins go (one folder each)")
    parser.add_argument("--work", default="runs/toy-plugins", help="encoded scenes and checkpoints (one folder each)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        plugins = [toy_plugin(name) for name in args.plugins]
        for plugin in plugins:
            cfg = ToyTrainConfig(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
            out = Path(args.out_dir) / plugin.name
            started = time.time()
            info = build_toy_plugin(plugin, out, Path(args.work) / plugin.name, cfg)
            minutes = (time.time() - started) / 60
            command = " ".join(["python scripts/build_toy_plugins.py", "--plugins", plugin.name,
                                *(["--steps", str(args.steps)] if args.steps else []), "--seed", str(args.seed)])
            (out / "README.md").write_text(
                f"# {plugin.name}\n\n{DESCRIPTIONS[plugin.kind]} for polybridge-tiny, trained on the English side "
                f"only (English captions{' + `' + plugin.words + '`' if plugin.words else ''}; effect: "
                f"{plugin.effect} → {plugin.target}).\n\n    {command}\n\n{cfg.steps} steps of {cfg.batch}, "
                f"final loss {info['loss']:.4f}, {minutes:.1f} min on {torch.get_num_threads()} CPU threads"
                f"{' (resumed at step ' + str(info['resumed_at']) + ')' if info['resumed_at'] else ''}.\n",
                encoding="utf-8")
            print(f"{plugin.name}: wrote {out} ({minutes:.1f} min, loss {info['loss']:.4f}; {shlex.quote(command)})")
    except PolyBridgeError as exc:
        print(f"build_toy_plugins: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
