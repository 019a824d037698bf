"""Router throughput and memory, on the hand-written prompt set (tests/data/router_prompts.tsv).

    python benchmarks/perf/router.py               # prompts/s (cold, warm words, cached plans), peak memory
    python benchmarks/perf/router.py --compare     # also: lingua vs langid on the Latin-script prompts
    python benchmarks/perf/router.py --accuracy    # also: per-language accuracy and mixed-prompt splits

Three throughputs, each over every prompt of the set, each a separate figure (nothing is averaged away):

- **cold**: a fresh router (lingua's models loaded beforehand, load time printed apart), every prompt
  routed once: each new Latin-script word is a lingua call;
- **known words**: plans are not cached, every prompt is planned again, but its words were seen before
  (steady state of a server: prompts are new, their words mostly are not);
- **repeated prompts**: the per-prompt plan cache answers (the same prompt routed again, e.g. n images).

Peak memory is the process's peak resident set size (VmHWM): Python, lingua's models, caches.
Each warm figure is the median of ``--repeat`` passes, in wall-clock and in CPU time of this process (on a
loaded machine the CPU figure is the fairer one).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from polybridge.registry import load_registry  # noqa: E402
from polybridge.router import Router, format_scores, read_route_set, score_routes  # noqa: E402

PROMPTS = REPO / "tests" / "data" / "router_prompts.tsv"
LATIN = ("en", "es", "fr", "de")


def peak_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM (Linux; unlike ru_maxrss it does not carry a
    forking parent's peak into a child), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; macOS: bytes (rough)


def timed(fn, prompts: list[str], repeat: int) -> tuple[float, float]:
    """(prompts per wall second, prompts per CPU second) of the median of ``repeat`` timed passes."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn(prompts)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    walls.sort()
    cpus.sort()
    return len(prompts) / walls[len(walls) // 2], len(prompts) / max(cpus[len(cpus) // 2], 1e-9)


def throughput(registry, prompts: list[str], repeat: int) -> None:
    started = time.perf_counter()
    router = Router.from_registry(registry)
    if router.scorer is not None:
        router.scorer.known  # noqa: B018 - loads lingua's models, timed apart
    load_s = time.perf_counter() - started
    rss_loaded = peak_mb()
    print(f"{len(prompts)} prompts; router + lingua models loaded in {load_s:.2f} s (peak RSS {rss_loaded:.0f} MB)")
    rows = []
    rows.append(("cold (fresh caches, one pass)", *timed(router.plan_many, prompts, 1)))
    planner = router._plan  # plans not cached; the word cache is warm now
    rows.append(("known words (plans recomputed)", *timed(lambda ps: [planner(p) for p in ps], prompts, repeat)))
    rows.append(("repeated prompts (plan cache)", *timed(router.plan_many, prompts, repeat)))
    print(f"{'case':34} {'prompts/s (wall)':>17} {'prompts/s (CPU)':>16}")
    for name, wall, cpu in rows:
        print(f"{name:34} {wall:17,.0f} {cpu:16,.0f}")
    long = "a cat on a sofa, " * 600  # 10,200 characters
    t = time.perf_counter()
    Router.from_registry(registry, cache_size=0).plan(long)
    print(f"one {len(long):,}-character prompt: {1000 * (time.perf_counter() - t):.1f} ms")
    print(f"peak memory (peak RSS of this process): {peak_mb():.0f} MB")


def accuracy(registry, rows: list[tuple[str, str]]) -> None:
    scores = score_routes(Router.from_registry(registry), rows)
    print("\naccuracy on the hand-written set (single-language prompts: one span in that language; "
          "mixed: the same spans)")
    print(format_scores(scores))


DETECTORS = ("lingua-high", "lingua-low", "router", "langid")


def measure_detector(name: str, rows: list[tuple[str, str]], repeat: int) -> dict:
    """One detector on the Latin-script single-language prompts, in this (fresh) process: accuracy,
    CPU microseconds per prompt, load time and the resident memory its models add."""
    latin = [(e, p) for e, p in rows if e in LATIN]
    before = peak_mb()
    started = time.perf_counter()
    if name.startswith("lingua"):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*[getattr(IsoCode639_1, c.upper()) for c in LATIN])
        builder = builder.with_preloaded_language_models()
        detector = (builder.with_low_accuracy_mode() if name == "lingua-low" else builder).build()

        def classify(p):
            return detector.compute_language_confidence_values(p)[0].language.iso_code_639_1.name.lower()
    elif name == "router":  # per-word lingua with the prior, before the threshold fallback; word cache warm
        router = Router({c: ("Latin",) for c in LATIN}, threshold=0.0, cache_size=0)
        router.scorer.known  # noqa: B018 - loads lingua

        def classify(p):
            return router.plan(p).spans[0].language
    else:
        from langid.langid import LanguageIdentifier, model

        ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        ident.set_languages(list(LATIN))

        def classify(p):
            return ident.classify(p)[0]
    load_s = time.perf_counter() - started
    hits = sum(classify(p) == e for e, p in latin)  # also warms the router's word cache
    cpu = time.process_time()
    for _ in range(repeat):
        for _, p in latin:
            classify(p)
    us = 1e6 * (time.process_time() - cpu) / (repeat * len(latin))
    return {"detector": name, "prompts": len(latin), "accuracy": hits / len(latin), "us_per_prompt_cpu": us,
            "load_s": load_s, "rss_added_mb": peak_mb() - before}


def compare(repeat: int) -> None:
    """Each detector in its own process (so memory is its own): lingua high/low accuracy, the router's
    per-word lingua, langid."""
    import json
    import subprocess

    print(f"\nLatin-script single-language prompts ({', '.join(LATIN)}), detectors restricted to those languages; "
          "each in a fresh process")
    print(f"{'detector':13} {'accuracy':>9} {'us/prompt (CPU)':>16} {'load s':>7} {'RSS added':>10}")
    for name in DETECTORS:
        done = subprocess.run([sys.executable, __file__, "--detector", name, "--repeat", str(repeat)],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{name:13} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:13} {r['accuracy']:9.1%} {r['us_per_prompt_cpu']:16.1f} {r['load_s']:7.2f} "
              f"{r['rss_added_mb']:9.0f}M")
    print("router: threshold 0 (the detector's own answer); with the registry's threshold, unsure answers go to "
          "the fallback language")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="passes for the warm figures (default 20)")
    parser.add_argument("--accuracy", action="store_true", help="print per-language accuracy too")
    parser.add_argument("--compare", action="store_true", help="compare lingua and langid on the Latin prompts")
    parser.add_argument("--detector", choices=DETECTORS, help=argparse.SUPPRESS)  # one detector, JSON (for --compare)
    args = parser.parse_args()
    rows = read_route_set(PROMPTS)
    if args.detector:
        import json

        print(json.dumps(measure_detector(args.detector, rows, args.repeat)))
        return
    registry = load_registry(REPO)
    throughput(registry, [p for _, p in rows], args.repeat)
    if args.accuracy:
        accuracy(registry, rows)
    if args.compare:
        compare(max(1, args.repeat // 4))


if __name__ == "__main__":
    main()
