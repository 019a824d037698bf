"""Captioning speed of every registered grammar: synthetic scenes captioned per second.

    python benchmarks/perf/captions.py              # 10,000 training-split scenes per language
    python benchmarks/perf/captions.py -n 2000

The branch trainer captions its 20,000 scenes once per run and the benchmark its suites once, so this is a check that
the grammars never become the slow part (rendering and the encoders are): each language's captions of the same
scenes are timed in wall-clock and CPU time of this process; on a loaded machine the CPU figure is the fairer one.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from polybridge.registry import load_registry  # noqa: E402
from polybridge.synthetic.captions import load_grammars  # noqa: E402
from polybridge.synthetic.scenes import sample_scenes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="scenes per language (default 10,000)")
    parser.add_argument("--registry", type=Path, default=REPO / "registry.yaml")
    args = parser.parse_args(argv)
    grammars = load_grammars(load_registry(args.registry))
    scenes = sample_scenes(args.n, seed=0, split="train")
    print(f"{args.n} training-split scenes per language\n")
    print("| language | captions/s (wall) | captions/s (CPU) | seconds for 20,000 (CPU) |")
    print("|---|---|---|---|")
    for code, grammar in grammars.items():
        rng = random.Random(0)
        wall, cpu = time.perf_counter(), time.process_time()
        for scene in scenes:
            grammar.caption(scene, rng)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"| {code} | {args.n / wall:,.0f} | {args.n / cpu:,.0f} | {20_000 * cpu / args.n:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
