"""Memory against dataset size: the trainer on 1k, 10k and 100k streamed synthetic examples.

    python benchmarks/perf/data_scale.py                        # 1k, 10k, 100k
    python benchmarks/perf/data_scale.py --sizes 1000 10000     # fewer
    python benchmarks/perf/data_scale.py --json                 # one JSON line per size as well

Each size runs in a fresh process (so each peak is its own): :func:`polybridge.training.trainer.train_language` on a
``datasets.IterableDataset`` whose examples are made as they are read (images of 8-40 px a side in RGB, L and RGBA,
captions numbered), never held in memory. The run streams them into the sharded on-disk cache (each image decoded,
resized, cropped, VAE-encoded, its caption encoded) and then trains a few steps reading the cache memory-mapped. The
architecture is the test suite's tiny one (16x16 images, UNet 32/64, a 48-wide 2-layer native encoder, 16 tokens), so
100k examples fit a small CPU: the point is memory, not convergence. Printed per size: peak resident memory of the
process (``ru_maxrss``), examples encoded per second (the streaming pass), training samples per second, and the
cache's size on disk; then the growth of peak memory from the smallest size to the largest (target: under 10%).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def synthetic_stream(n: int, shards: int = 8):
    """``n`` image/caption rows made lazily, in ``shards`` generator shards (so processes can split them)."""
    import datasets
    import numpy as np
    from PIL import Image

    def rows(shard_ids: list[int]):
        for shard in shard_ids:
            for i in range(shard, n, shards):
                rng = np.random.default_rng(i)
                w, h = (int(v) for v in rng.integers(8, 41, 2))
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
                image = image.convert(("RGB", "L", "RGBA")[i % 3])
                yield {"image": image, "caption_zh": f"第 {i} 张 红色的圆"}

    features = datasets.Features({"image": datasets.Image(), "caption_zh": datasets.Value("string")})
    return datasets.IterableDataset.from_generator(rows, gen_kwargs={"shard_ids": list(range(shards))},
                                                   features=features)


def _registry(root: Path) -> Path:
    """The test suite's tiny backbone, with zh's native encoder the tiny 48-wide one, 16 tokens."""
    sys.path.insert(0, str(REPO / "tests"))
    import yaml
    from conftest import registry_with_tiny_backbone
    from tiny_components import clip_text_model, clip_tokenizer

    registry = registry_with_tiny_backbone(root)
    folder = root / "languages" / "zh"
    for name in ("encoder", "tokenizer"):
        shutil.rmtree(folder / name, ignore_errors=True)
    clip_text_model(48, seed=1, max_positions=16).save_pretrained(folder / "encoder")
    clip_tokenizer(16).save_pretrained(folder / "tokenizer")
    entry = yaml.safe_load((folder / "language.yaml").read_text(encoding="utf-8"))
    entry["encoder"].update({"max_length": 16, "model_class": "CLIPTextModel"})
    entry["data"] = {"dataset": "synthetic", "caption_column": "caption_zh", "streaming": True,
                     "cache_shard_rows": 512}
    (folder / "language.yaml").write_text(yaml.safe_dump(entry, allow_unicode=True), encoding="utf-8")
    return registry


def one(n: int, root: Path, steps: int, batch: int) -> dict:
    """One size, in this process: train, then report."""
    import torch

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    from polybridge.registry import load_registry
    from polybridge.training.trainer import TrainOptions, train_language

    registry = load_registry(root / "registry.yaml")
    encode: dict[str, float] = {}

    def log(message: str) -> None:
        if "cache files" in message:
            encode["done"] = time.perf_counter()

    started = time.perf_counter()
    info = train_language(registry, "zh", TrainOptions(
        dataset=synthetic_stream(n), num_samples=n, max_steps=steps, batch_size=batch, warmup_steps=1,
        checkpoint_every=steps, progress=False, cache_batch=256, work_dir=root / f"work-{n}",
        out_dir=root / f"out-{n}"), log=log)
    cache = sum(f.stat().st_size for f in (root / f"work-{n}" / "encoded").rglob("*.safetensors"))
    return {"examples": info["examples"], "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                              / 1024, 1),
            "encode_examples_per_s": round(n / (encode["done"] - started), 1),
            "train_samples_per_s": info["samples_per_s"], "cache_mb": round(cache / 2 ** 20, 1), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a size, in a child process
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.root, args.steps, args.batch_size)), flush=True)
        return 0
    root = Path(tempfile.mkdtemp(prefix="polybridge-data-scale-"))
    try:
        _registry(root)
        results = []
        for n in args.sizes:
            done = subprocess.run([sys.executable, __file__, "--one", str(n), "--root", str(root), "--steps",
                                   str(args.steps), "--batch-size", str(args.batch_size)],
                                  capture_output=True, text=True, env={**__import__("os").environ,
                                                                       "OMP_NUM_THREADS": "1",
                                                                       "PYTHONPATH": str(REPO)})
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(lines[-1].removeprefix("RESULT "))
            results.append(result)
            print(f"{n:>7} examples: peak memory {result['peak_rss_mb']:8.1f} MB, encoded "
                  f"{result['encode_examples_per_s']:7.1f} examples/s, trained {result['train_samples_per_s']} "
                  f"samples/s, cache {result['cache_mb']} MB on disk", flush=True)
            if args.json:
                print(json.dumps({"size": n, **result}), flush=True)
            shutil.rmtree(root / f"work-{n}", ignore_errors=True)
        if len(results) > 1:
            growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"] - 1
            print(f"peak memory from {args.sizes[0]} to {args.sizes[-1]} examples: {growth:+.1%} (target: under +10%)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
