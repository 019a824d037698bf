#!/usr/bin/env python
"""How much of each object style the embedded backbone's VAE can carry: ground-truth scenes in each style, through
a VAE round trip (encode, decode), read back by the plugin scorer. No plugin can draw more of a style than this.

    python scripts/measure_vae_styles.py [-n 256] [--seed 7]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from polybridge.registry import load_registry
from polybridge.synthetic.batches import render_batch
from polybridge.synthetic.plugin_scorer import load_plugin_scorer
from polybridge.synthetic.scenes import sample_scenes
from polybridge.synthetic.world import STYLES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=256, help="scenes per style")
    parser.add_argument("--seed", type=int, default=7, help="scene seed (test split)")
    args = parser.parse_args()
    registry = load_registry()
    vae = AutoencoderKL.from_pretrained(registry.backbone_source(registry.default_backbone) / "vae").eval()
    scorer = load_plugin_scorer()
    print("style     style  shape  colour  size  position  background  scene")
    for style in STYLES:
        scenes = sample_scenes(args.n, args.seed, "test", styles=[style])
        with torch.no_grad():
            x = render_batch(scenes, 32)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        images = [Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for t in y]
        r = scorer.score(images, scenes)
        print(f"{style:8s}  " + "  ".join(f"{r[k]:.3f}" for k in
                                         ("style", "shape", "colour", "size", "position", "background", "scene")))


if __name__ == "__main__":
    main()
