"""Router throughput and memory, on the hand-written prompt set (tests/data/router_prompts.tsv).

    python benchmarks/perf/router.py               # prompts/s, cold and warm, one by one and batched; peak memory
    python benchmarks/perf/router.py --compare     # also: lingua vs langid on the Latin-script prompts
    python benchmarks/perf/router.py --accuracy    # also: per-language accuracy and mixed-prompt splits

Every case runs over every prompt of the set, through both paths side by side: **one by one**
(``Router.plan`` per prompt) and **batched** (one ``Router.plan_many`` call for the whole list, which hands
the new words of all prompts to lingua in one call, spread over lingua's Rust threads). The cases:

- **cold**: a fresh router (lingua's models and the seed words loaded beforehand, timed apart), every prompt
  routed once: each Latin-script word that is not a seed word is a lingua call (~45 us);
- **cold, no seed words**: the same with an empty seed: every new Latin-script word is a lingua call;
- **known words**: plans are not cached, every prompt is planned again, but its words were seen before
  (steady state of a server: prompts are new, their words mostly are not);
- **repeated prompts**: the per-prompt plan cache answers (the same prompt routed again, e.g. n images).

Each figure is the median of its passes (cold: ``--cold`` fresh routers; warm: ``--repeat`` passes; the
cases take turns, round by round), in wall-clock time and in CPU time of this process (all its threads; on
a loaded machine the CPU figure is the fairer one). ``--heldout`` (default: the benchmark prompt sets, benchmarks/prompts/*.yaml, native and English
texts, when present) repeats the cold cases on prompts the seed words were not written with in mind.
Peak memory is the process's peak resident set size (VmHWM): Python, lingua's models, caches.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from polybridge.registry import load_registry  # noqa: E402
from polybridge.router import Router, WordScorer, format_scores, read_route_set, score_routes  # noqa: E402

PROMPTS = REPO / "tests" / "data" / "router_prompts.tsv"
HELDOUT = REPO / "benchmarks" / "prompts"
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


def one_by_one(router: Router, prompts: list[str]) -> None:
    for p in prompts:
        router.plan(p)


def batched(router: Router, prompts: list[str]) -> None:
    router.plan_many(prompts)


PATHS = (one_by_one, batched)


def fresh(registry, seed: bool = True) -> Router:
    """A fresh router with lingua and its seed words loaded (lingua's models and the seed words' scores are
    made once a process, shared by all routers)."""
    router = Router.from_registry(registry, scorer=None if seed else WordScorer(LATIN, seed=()))
    if router.scorer is not None:
        router.scorer.known  # noqa: B018 - loads lingua and scores the seed words
    return router


def lingua_calls(registry, prompts: list[str], seed: bool) -> str:
    """How many lingua calls a cold pass makes (Latin-script words new to the router), per prompt."""
    router = fresh(registry, seed)
    before = router.scorer.lingua_calls
    router.plan_many(prompts)
    return f"{(router.scorer.lingua_calls - before) / len(prompts):.2f}"


def measure(cases: list[tuple], rounds: int) -> list[tuple]:
    """Each case ``(name, prompts, make_router, calls)`` through both paths, ``rounds`` times, interleaved
    (round by round, so that a busy spell of the machine does not fall on one case): per case and path,
    (prompts per wall second, prompts per CPU second) of the median pass."""
    walls: dict[tuple[int, int], list[float]] = {}
    cpus: dict[tuple[int, int], list[float]] = {}
    for _ in range(rounds):
        for i, (_, prompts, make_router, _) in enumerate(cases):
            for j, path in enumerate(PATHS):
                router = make_router()
                wall, cpu = time.perf_counter(), time.process_time()
                path(router, prompts)
                walls.setdefault((i, j), []).append(time.perf_counter() - wall)
                cpus.setdefault((i, j), []).append(time.process_time() - cpu)
    return [(name, calls, [(len(prompts) / statistics.median(walls[i, j]),
                            len(prompts) / max(statistics.median(cpus[i, j]), 1e-9)) for j in range(len(PATHS))])
            for i, (name, prompts, _, calls) in enumerate(cases)]


def print_rows(rows: list[tuple]) -> None:
    print(f"{'case':38} {'lingua':>6} {'one by one (wall / CPU)':>25} {'batched (wall / CPU)':>23}")
    print(f"{'':38} {'calls':>6}")
    for name, calls, cells in rows:
        print(f"{name:38} {calls:>6} " + " ".join(f"{w:12,.0f} /{c:10,.0f}" for w, c in cells))


def read_heldout(folder: Path) -> list[str]:
    """The native and English texts of the benchmark prompt sets (``prompts: [{text, en}, ...]`` in each
    YAML file of ``folder``), each once."""
    import yaml

    prompts: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for item in data.get("prompts") or []:
            prompts += [item[k] for k in ("text", "en") if isinstance(item, dict) and isinstance(item.get(k), str)]
    return list(dict.fromkeys(p for p in prompts if p.strip()))


def throughput(registry, prompts: list[str], repeat: int, cold: int, heldout: list[str]) -> None:
    started = time.perf_counter()
    router = fresh(registry)  # lingua's models and the seed words, timed apart
    load_s = time.perf_counter() - started
    seed_s = time.perf_counter()
    seed_words = router.scorer.seed_words  # the registry's (each entry's detection.seed_words)
    WordScorer(LATIN, seed=()).score(seed_words)  # what scoring the seed words costs (once a process)
    seed_s = time.perf_counter() - seed_s
    print(f"{len(prompts)} prompts; router + lingua models + {len(seed_words):,} seed words loaded in {load_s:.2f} s "
          f"(the seed words alone: {seed_s:.2f} s), peak RSS {peak_mb():.0f} MB")
    cases = []
    for label, texts in (("", prompts), (f" (held-out, {len(heldout)})", heldout)):
        if texts:
            cases += [(f"cold{label}", texts, lambda: fresh(registry), lingua_calls(registry, texts, True)),
                      (f"cold, no seed words{label}", texts, lambda: fresh(registry, False),
                       lingua_calls(registry, texts, False))]
    rows = measure(cases, cold)
    router.plan_many(prompts)  # its words are known now
    uncached = Router.from_registry(registry, cache_size=0, scorer=router.scorer)  # plans recomputed
    rows[2:2] = measure([("known words (plans recomputed)", prompts, lambda: uncached, "0"),
                         ("repeated prompts (plan cache)", prompts, lambda: router, "0")], repeat)
    print(f"prompts per second, medians of {cold} cold and {repeat} warm passes; lingua calls: per prompt, "
          "in a cold pass")
    print_rows(rows)
    long = "a cat on a sofa, " * 600  # 10,200 characters
    router = fresh(registry)
    t = time.perf_counter()
    router.plan(long)
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
    parser.add_argument("--cold", type=int, default=15, help="fresh routers for the cold figures (default 15)")
    parser.add_argument("--heldout", type=Path, default=HELDOUT,
                        help="a folder of prompt-set YAML files for the held-out cold figures ('' for none; "
                             "default: benchmarks/prompts, when present)")
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
    heldout = read_heldout(args.heldout) if str(args.heldout) not in ("", ".") and args.heldout.is_dir() else []
    throughput(registry, [p for _, p in rows], args.repeat, args.cold, heldout)
    if args.accuracy:
        accuracy(registry, rows)
    if args.compare:
        compare(max(1, args.repeat // 4))


if __name__ == "__main__":
    main()
