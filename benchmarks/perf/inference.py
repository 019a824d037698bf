"""Inference figures, each a ratio of two sides measured turn about in one process (medians of the rounds).

    python benchmarks/perf/inference.py                     # the embedded default (tiny): step, mixed, memory, server
    python benchmarks/perf/inference.py --parts profile     # why the mixed call gains what it gains here
    python benchmarks/perf/inference.py --sd15 --steps 3 --batch 1 --parts step memory   # SD 1.5's architecture
    python benchmarks/perf/inference.py --device cuda --sd15   # on a GPU (the targets are about SD 1.5's size)

1. ``step``: the cost of a pipeline call (``output_type="latent"``: text encoders + the denoising loop) and of one
   denoising step (the median time between consecutive step ends, so without the encoders run once a call) with a
   bdm branch and with a pea adapter against the plain backbone on an English prompt, same batch and steps
   (targets at SD 1.5's size: bdm <= 1.38x, the FLOP ratio being 1.35; pea <= 1.05x).
2. ``mixed``: 4 languages x 4 prompts in one call, against four per-language pipelines each with its own backbone
   (one call each), and against 16 single calls. At SD 1.5's size on a CPU the four calls run on one backbone (the
   same computation; four SD 1.5 backbones do not fit a small machine's memory); the JSON says which.
3. ``memory``: in a fresh process, the memory that loading one pipeline with 6 languages adds (the resident set on a
   CPU, allocated memory on CUDA) against backbone + encoders + branches counted apart (target <= 1.10x), the peak
   of a call with a prompt in each language, and what 6 per-language pipelines would hold.
4. ``server``: ``polybridge serve``'s app in process (httpx's ASGI transport, no sockets) under 64 concurrent
   clients in 4 languages, against the same 64 requests one at a time: throughput, p50/p95 latency, requests lost.
5. ``profile``: why the mixed call gains what it gains on this device: the backbone UNet's time per row at the mixed
   call's batch (16 prompts, 32 rows under guidance) against a per-language call's (4 prompts, 8 rows), which bounds
   what batching can pay; and where the mixed call's time goes (UNet, branches, text encoders, VAE, the rest).

SD 1.5's architecture has random weights built in code (``benchmarks/perf/train_throughput.py``'s builder); its native
encoder is 1024 wide (Chinese-CLIP's width) with 2 layers (the encoder runs once a call, not per step). A pea adapter
is 1024 -> 2048 -> 2048 -> 768 there (README, "Branches and the pipeline"); at the tiny size 96 -> 768 -> 768 -> 64.
Writes JSON to ``--out`` (default ``benchmarks/results/inference-<arch>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from polybridge.branches import get_branch_class  # noqa: E402
from polybridge.pipeline import PolyBridgePipeline  # noqa: E402

MIXED = {"en": ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
                "a small yellow circle"],
         "zh": ["左边有一个红色的灯笼", "在黑色背景上有一个蓝色的圆", "右边有一个绿色的三角形", "上面有一个黄色的方块"],
         "ja": ["左に赤い鳥居", "黒い背景に青い丸", "右に緑の三角", "上に黄色い四角"],
         "ru": ["красный фонарь слева", "синий круг на чёрном фоне", "зелёный треугольник справа", "жёлтый квадрат"]}
SIX = {"zh": "左边有一个红色的灯笼", "ja": "左に赤い鳥居", "ko": "왼쪽에 빨간 원", "ru": "красный фонарь слева",
       "ar": "دائرة حمراء على اليسار", "es": "un círculo rojo a la izquierda"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _interleaved(sides: dict, rounds: int, device: str) -> dict[str, float]:
    """Median seconds of each side, the sides run turn about in every round (one warm-up round first)."""
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            times[name].append(_timed(sides[name], device))
    return {name: statistics.median(v) for name, v in times.items()}


# --------------------------------------------------------------------------- building the pipelines


def _tiny(languages: list[str], device: str) -> PolyBridgePipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = PolyBridgePipeline.from_registry(languages=["en", *languages], device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd15_folder(work: Path) -> Path:
    """SD 1.5's architecture with random weights, saved once in ``work``."""
    from train_throughput import _random_backbone

    folder = work / "sd15"
    if not folder.exists():
        _random_backbone(folder, sd15=True)
    return folder


def _sd15(work: Path, languages: list[str], device: str) -> PolyBridgePipeline:
    """SD 1.5's architecture with random weights; each language a random 1024-wide, 2-layer native encoder (its
    committed tokenizer) and an untrained bdm branch (zero convs perturbed, so that it does work)."""
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from polybridge.encoders import NativeEncoder

    sd = StableDiffusionPipeline.from_pretrained(_sd15_folder(work), safety_checker=None, requires_safety_checker=False)
    pipe = PolyBridgePipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                              scheduler=sd.scheduler)
    for i, code in enumerate(languages):
        tok = AutoTokenizer.from_pretrained(REPO / "languages" / code / "tokenizer")
        torch.manual_seed(i)
        model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096,
                                             num_hidden_layers=2, num_attention_heads=16, max_position_embeddings=64,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
        encoder = NativeEncoder(model, tok, code=code, name=f"random-1024/{code}", max_length=64)
        pipe.add_language(code, encoder, get_branch_class("bdm").from_unet(pipe.unet, 1024))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _with_pea(pipe: PolyBridgePipeline, code: str, sd15: bool) -> str:
    """Add ``code``'s encoder again as language ``pea`` with a random pea adapter; its code."""
    encoder = pipe.encoders[code]
    options = {} if sd15 else {"hidden_size": 768}
    adapter = get_branch_class("pea").from_unet(pipe.unet, encoder.hidden_size, **options)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pipe.add_language("pea", encoder, adapter.to(pipe.device))
    return "pea"


def _params(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


# --------------------------------------------------------------------------- the parts


def part_step(pipe: PolyBridgePipeline, args, sd15: bool) -> dict:
    """Per call and per denoising step: a step's cost is the median time between consecutive ends of steps
    (``callback_on_step_end``), so the encoders, run once a call, are left out of it."""
    pea = _with_pea(pipe, "zh", sd15)
    prompt_zh, prompt_en = MIXED["zh"][0], MIXED["en"][0]
    steps: dict[str, list[float]] = {"plain": [], "bdm": [], "pea": []}
    unet_seconds = dict.fromkeys(steps, 0.0)  # the UNet's time in each side's calls
    # and where a bdm step's time goes: the UNet, the branch, the rest (composing, the scheduler)
    spent, handles = _module_seconds({"unet": pipe.unet, "branch": pipe.branches["zh"]}, args.device)

    def call(prompt, code, side):
        ends: list[float] = []

        def on_step_end(_pipe, i, _t, _kw):
            _sync(args.device)
            ends.append(time.perf_counter())
            return {}

        def run():
            ends.clear()
            unet_before = spent["unet"]
            pipe([prompt] * args.batch, language=code, generator=torch.Generator().manual_seed(0),
                 num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent",
                 callback_on_step_end=on_step_end)
            steps[side].extend(b - a for a, b in itertools.pairwise(ends))
            unet_seconds[side] += spent["unet"] - unet_before
        return run

    try:
        t = _interleaved({"plain": call(prompt_en, "en", "plain"), "bdm": call(prompt_zh, "zh", "bdm"),
                          "pea": call(prompt_zh, pea, "pea")}, args.rounds, args.device)
    finally:
        for h in handles:
            h.remove()
    per_step = {k: statistics.median(v) for k, v in steps.items()} if args.steps > 1 else None
    calls = args.rounds + 1  # the warm-up round too
    bdm_split = {"unet": unet_seconds["bdm"] / (calls * args.steps), "branch": spent["branch"] / (calls * args.steps),
                 "unet_in_a_plain_step": unet_seconds["plain"] / (calls * args.steps)}
    return {"seconds": t, "bdm_vs_plain": t["bdm"] / t["plain"], "pea_vs_plain": t["pea"] / t["plain"],
            "bdm_step_split_seconds": bdm_split, "step_seconds": per_step,
            "step_bdm_vs_plain": per_step and per_step["bdm"] / per_step["plain"],
            "step_pea_vs_plain": per_step and per_step["pea"] / per_step["plain"],
            "batch": args.batch, "steps": args.steps, "targets_sd15": {"bdm": 1.38, "pea": 1.05}}


def part_mixed(pipe: PolyBridgePipeline, args, sd15: bool, work: Path) -> dict:
    codes = list(MIXED)
    prompts = [p for c in codes for p in MIXED[c]]
    languages = [c for c in codes for _ in MIXED[c]]
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent")
    gens = lambda k: [torch.Generator().manual_seed(i) for i in range(k)]  # noqa: E731
    # four per-language pipelines, each with its own backbone (as peers load a model per language)
    if sd15 and not args.device.startswith("cuda"):  # four SD 1.5 backbones do not fit a small machine's memory:
        per_language = {c: pipe for c in codes}     # the same four calls on one backbone (the same computation)
    else:
        per_language = {c: (_sd15(work, [] if c == "en" else [c], args.device) if sd15 else
                            _tiny([] if c == "en" else [c], args.device)) for c in codes}
    sides = {
        "mixed_one_call": lambda: pipe(prompts, language=languages, generator=gens(16), **kw),
        "four_pipelines": lambda: [per_language[c](MIXED[c], language=c, generator=gens(4), **kw) for c in codes],
        "sixteen_calls": lambda: [pipe(p, language=c, generator=gens(1), **kw) for p, c in zip(prompts, languages)],
    }
    t = _interleaved(sides, args.rounds, args.device)
    return {"seconds": t, "images_per_second": {k: 16 / v for k, v in t.items()},
            "four_pipelines_own_backbones": any(p is not pipe for p in per_language.values()),
            "mixed_vs_four_pipelines": t["four_pipelines"] / t["mixed_one_call"],
            "mixed_vs_sixteen_calls": t["sixteen_calls"] / t["mixed_one_call"],
            "target": {"mixed_vs_four_pipelines": 2.5}}


def _resident(device: str) -> tuple[int, int]:
    """(now, peak) bytes: the process's resident set on a CPU (``/proc/self/status``), allocated memory on CUDA."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def memory_child(args) -> dict:
    """In a fresh process: memory before and after loading one pipeline with 6 languages, and at the peak of a
    call with a prompt in each, against the bytes of its parts counted apart."""
    import gc

    from diffusers import StableDiffusionPipeline  # noqa: F401  (imported before the first reading: code is not the model)
    from transformers import AutoTokenizer, CLIPTextModel  # noqa: F401

    work = Path(args.memory_child)
    gc.collect()
    before, _ = _resident(args.device)
    pipe = _sd15(work, list(SIX), args.device) if args.sd15 else _tiny(list(SIX), args.device)
    for module in pipe.components.values():  # weights read lazily (memory-mapped files) count once they are read
        for p in module.parameters() if isinstance(module, torch.nn.Module) else ():
            p.sum()
    gc.collect()
    loaded, _ = _resident(args.device)
    backbone = _params(pipe.unet, pipe.vae, pipe.text_encoder)
    parts = {c: _params(pipe.encoders[c]) + _params(pipe.branches[c]) for c in SIX}
    apart = backbone + sum(parts.values())
    pipe(list(SIX.values()), language=list(SIX), num_inference_steps=1, guidance_scale=7.5, output_type="latent",
         generator=[torch.Generator().manual_seed(i) for i in range(6)])
    _, peak = _resident(args.device)
    per_language = sum(backbone + b for b in parts.values())
    return {"measured": "CUDA memory allocated" if args.device.startswith("cuda") else "process resident set (RSS)",
            "languages_loaded": list(SIX), "parts_apart_bytes": apart, "loaded_bytes": loaded - before,
            "loaded_vs_parts": (loaded - before) / apart, "peak_in_a_call_bytes": peak - before,
            "peak_vs_parts": (peak - before) / apart, "each_parameter_once": _params(
                *(m for m in pipe.components.values() if isinstance(m, torch.nn.Module))) == apart,
            "six_per_language_pipelines_bytes": per_language,
            "per_language_pipelines_vs_loaded": per_language / (loaded - before),
            "target": {"loaded_vs_parts": 1.10}}


def part_memory(args, work: Path) -> dict:
    """``memory_child`` in a fresh interpreter (a process's memory only grows, so it must start clean)."""
    import subprocess

    argv = [sys.executable, __file__, "--memory-child", str(work), "--device", args.device,
            *(["--sd15"] if args.sd15 else []), *(["--threads", str(args.threads)] if args.threads else [])]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the memory part's child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _module_seconds(modules: dict[str, torch.nn.Module], device: str) -> tuple[dict[str, float], list]:
    """Forward hooks adding up each named module's forward time (outermost calls only)."""
    spent = {name: 0.0 for name in modules}
    handles = []
    for name, module in modules.items():
        started: list[float] = []

        def pre(_m, _a, started=started):
            _sync(device)
            started.append(time.perf_counter())

        def post(_m, _a, _o, name=name, started=started):
            _sync(device)
            t = started.pop()
            if not started:
                spent[name] += time.perf_counter() - t
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return spent, handles


def part_profile(pipe: PolyBridgePipeline, args) -> dict:
    codes = list(MIXED)
    prompts = [p for c in codes for p in MIXED[c]]
    languages = [c for c in codes for _ in MIXED[c]]
    unet = pipe.unet
    size = unet.config.sample_size
    ctx = torch.zeros(1, 77, unet.config.cross_attention_dim, device=args.device, dtype=unet.dtype)

    def unet_call(rows: int):
        x = torch.randn(rows, unet.config.in_channels, size, size, device=args.device, dtype=unet.dtype)
        return lambda: unet(x, 500, encoder_hidden_states=ctx.expand(rows, -1, -1))
    t = _interleaved({"rows_8": unet_call(8), "rows_32": unet_call(32)}, args.profile_rounds, args.device)
    bound = 4 * t["rows_8"] / t["rows_32"]
    # the VAE decodes through vae.decode(), not its forward: its decoder's forward is what runs
    modules = {"unet": pipe.unet, "vae": pipe.vae.decoder, "text_encoder": pipe.text_encoder,
               **{f"branch:{c}": b for c, b in pipe.branches.items()},
               **{f"encoder:{c}": e for c, e in pipe.encoders.items()}}
    spent, handles = _module_seconds({k: v for k, v in modules.items() if isinstance(v, torch.nn.Module)},
                                     args.device)
    gens = [torch.Generator().manual_seed(i) for i in range(16)]
    try:
        total = _timed(lambda: pipe(prompts, language=languages, generator=gens, num_inference_steps=args.steps,
                                    guidance_scale=7.5), args.device)
    finally:
        for h in handles:
            h.remove()
    split = {"unet": spent["unet"], "branches": sum(v for k, v in spent.items() if k.startswith("branch:")),
             "text_encoders": spent["text_encoder"] + sum(v for k, v in spent.items() if k.startswith("encoder:")),
             "vae": spent["vae"]}
    split["rest"] = total - sum(split.values())
    return {"unet_seconds": t, "unet_row_cost_32_vs_8": (t["rows_32"] / 32) / (t["rows_8"] / 8),
            "batching_bound_vs_four_calls": bound, "mixed_call_seconds": total,
            "mixed_call_split": {k: v / total for k, v in split.items()}}


def part_server(pipe: PolyBridgePipeline, args) -> dict:
    import httpx

    from polybridge.serve.app import ServeOptions, create_app

    clients = args.clients
    codes = list(MIXED)
    bodies = [{"prompt": MIXED[codes[i % 4]][(i // 4) % 4], "steps": args.server_steps, "seed": i}
              for i in range(clients)]

    async def run(concurrent: bool) -> tuple[float, list[float], int]:
        app = create_app(pipe, ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                            max_queue=max(256, clients)))
        app.state.service.batcher.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
                async def one(body):
                    t = time.perf_counter()
                    r = await client.post("/api/generate", json=body)
                    return time.perf_counter() - t, r.status_code
                started = time.perf_counter()
                if concurrent:
                    results = await asyncio.gather(*(one(b) for b in bodies))
                else:
                    results = [await one(b) for b in bodies]
                wall = time.perf_counter() - started
                metrics = (await client.get("/metrics")).json()
        finally:
            app.state.service.batcher.stop()
        lost = sum(code != 200 for _, code in results)
        return wall, sorted(lat for lat, _ in results), lost, metrics["batches"]

    out = {}
    for name, concurrent in (("one_at_a_time", False), ("concurrent", True), ("one_at_a_time_2", False),
                             ("concurrent_2", True)):
        wall, lat, lost, batches = asyncio.run(run(concurrent))
        out[name] = {"seconds": wall, "requests_per_second": clients / wall, "p50": lat[len(lat) // 2],
                     "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "lost": lost,
                     "mean_batch_rows": batches["mean_rows"]}
    seq = statistics.median([out["one_at_a_time"]["seconds"], out["one_at_a_time_2"]["seconds"]])
    con = statistics.median([out["concurrent"]["seconds"], out["concurrent_2"]["seconds"]])
    out["throughput_vs_one_at_a_time"] = seq / con
    out["clients"], out["steps"] = clients, args.server_steps
    out["lost_total"] = sum(v["lost"] for v in out.values() if isinstance(v, dict))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15", action="store_true", help="SD 1.5's architecture (random weights) instead of tiny")
    parser.add_argument("--parts", nargs="+", default=["step", "mixed", "memory", "server"],
                        choices=["step", "mixed", "memory", "server", "profile"])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps a call (parts step and mixed)")
    parser.add_argument("--batch", type=int, default=16, help="prompts a call in part step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-rounds", type=int, default=5, help="rounds of the profile's UNet timings")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--server-steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # the memory part's own process
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        with torch.no_grad():
            print(json.dumps(memory_child(args), default=float))
        return 0
    arch = "sd15" if args.sd15 else "tiny"
    result = {"arch": arch, "device": args.device, "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        work = Path(tmp)
        codes = list(MIXED)[1:] if "mixed" in args.parts or not args.sd15 else ["zh"]
        pipe = None
        if set(args.parts) - {"memory"}:  # the memory part loads its own, in its own process
            pipe = _sd15(work, codes, args.device) if args.sd15 else _tiny(codes, args.device)
        elif args.sd15:
            _sd15_folder(work)
        if "step" in args.parts:
            result["step"] = part_step(pipe, args, args.sd15)
            st = result["step"]
            print(f"[{arch}] per call, batch {args.batch}, {args.steps} steps: bdm {st['bdm_vs_plain']:.3f}x, "
                  f"pea {st['pea_vs_plain']:.3f}x the plain backbone", flush=True)
            if st["step_seconds"]:
                split = st["bdm_step_split_seconds"]
                print(f"[{arch}] per denoising step: bdm {st['step_bdm_vs_plain']:.3f}x, pea {st['step_pea_vs_plain']:.3f}x "
                      f"the plain backbone; in a bdm step the UNet takes {split['unet']:.3g}s (in a plain one "
                      f"{split['unet_in_a_plain_step']:.3g}s), the branch {split['branch']:.3g}s "
                      f"({split['branch'] / split['unet_in_a_plain_step']:.3f}x the plain UNet)", flush=True)
        if "mixed" in args.parts:
            m = result["mixed"] = part_mixed(pipe, args, args.sd15, work)
            print(f"[{arch}] 4x4 mixed in one call: {m['mixed_vs_four_pipelines']:.2f}x four per-language pipelines, "
                  f"{m['mixed_vs_sixteen_calls']:.2f}x sixteen single calls", flush=True)
        if "memory" in args.parts:
            mem = result["memory"] = part_memory(args, work)
            print(f"[{arch}] memory with 6 languages loaded ({mem['measured']}): {mem['loaded_vs_parts']:.3f}x "
                  f"backbone + encoders + branches counted apart, at a call's peak {mem['peak_vs_parts']:.2f}x; "
                  f"6 per-language pipelines would hold {mem['per_language_pipelines_vs_loaded']:.2f}x", flush=True)
        if "profile" in args.parts:
            pr = result["profile"] = part_profile(pipe, args)
            print(f"[{arch}] UNet time per row at 32 rows: {pr['unet_row_cost_32_vs_8']:.2f}x at 8 rows, so one call "
                  f"of 16 prompts can be at most {pr['batching_bound_vs_four_calls']:.2f}x four calls of 4 by "
                  "batching; the mixed call's time: " + ", ".join(f"{k} {v:.0%}" for k, v in
                                                                  pr["mixed_call_split"].items()), flush=True)
        if "server" in args.parts:
            s = result["server"] = part_server(pipe, args)
            print(f"[{arch}] server, {args.clients} clients: {s['throughput_vs_one_at_a_time']:.2f}x one at a time; "
                  f"concurrent p50 {s['concurrent']['p50']:.2f}s p95 {s['concurrent']['p95']:.2f}s; "
                  f"lost {s['lost_total']}", flush=True)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"inference-{arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=float) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
