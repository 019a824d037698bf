"""Write the readable snapshot of the synthetic benchmark suites: benchmarks/synthetic/<code>/{general,culture}.jsonl.

The suites are a pure function of the registry (each entry's benchmark.seed, synthetic_split, synthetic_prompts)
and the grammars; `polybridge bench` builds them in code, and tests/test_bench_suites.py checks that this snapshot
matches. Re-run after changing a grammar or a benchmark setting:

    python benchmarks/build_suites.py [--registry PATH] [--out benchmarks/synthetic]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    from polybridge.bench.suites import write_snapshots
    from polybridge.registry import load_registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=None, help="registry.yaml (default: the repository's)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "synthetic"), help="snapshot folder (replaced whole)")
    args = parser.parse_args()
    written = write_snapshots(load_registry(args.registry or REPO), args.out)
    print(f"wrote {len(written)} suites to {args.out}")


if __name__ == "__main__":
    main()
