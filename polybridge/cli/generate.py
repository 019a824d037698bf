"""``polybridge generate``: images from a prompt, or a file of prompts, in any registered language."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from polybridge import limits
from polybridge.cli.common import (CommandError, ResumableImages, check_grid, float_in, int_upto, positive_int,
                                   print_json, read_prompt_file, registry_of)


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    import PIL.Image
    import torch

    _check_arguments(args)
    reg = registry_of(args)
    prompts = read_prompt_file(args.file) if args.file else [args.prompt] * args.n
    needed, plans = _languages_needed(args, reg, prompts)
    target = Path(args.out if args.file else args.output)
    from polybridge.atomic import check_file_target, check_writable_parent

    if args.file:
        check_writable_parent(target)
    else:
        check_file_target(target, args.overwrite, "-o")
    untrained_codes = _announce_untrained(reg, needed)
    untrained = bool(untrained_codes)
    from polybridge.pipeline import PolyBridgePipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    if args.file:
        with ResumableImages(target, len(prompts), _resume_key(args, prompts), args.overwrite) as sink:
            _draw(args, PolyBridgePipeline, reg, needed, prompts, sink)
        written = sink.publish()
        with PIL.Image.open(written[0]) as first:
            size = first.size[0]
    else:
        images = _draw(args, PolyBridgePipeline, reg, needed, prompts)
        written, size = _write_images(args, target, images), images[0].size[0]
    record = {"prompts": prompts if args.file else [args.prompt], "n": len(written) if args.file else len(images),
              "language": args.lang or "auto",
              "trained_branch": not untrained,
              "fallback": (untrained_codes.get(args.lang) if args.lang else untrained_codes) if untrained else None,
              "routes": None if plans is None else [p.to_dict() for p in plans],
              "seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance, "negative_prompt": args.negative,
              "english_prompt": args.english_prompt, "size": size,
              "backbone": args.backbone or reg.default_backbone, **_plugins_record(args),
              "written": written, "seconds": round(time.time() - started, 2)}
    if args.json:
        print_json(record)
    else:
        print(f"wrote {written[0] if len(written) == 1 else target} ({record['n']} images, {record['seconds']}s)")
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse what cannot work before the registry or any model is read."""
    if (args.prompt is None) == (args.file is None):
        raise CommandError("give either a PROMPT or --file PROMPTS.txt (not both)")
    if args.file is not None and args.out is None:
        raise CommandError("--file needs --out DIR (one image per line goes there)")
    if args.file is None and args.output is None:
        raise CommandError("give -o OUT.png for the image grid")
    if args.prompt is not None and not args.prompt.strip():
        raise CommandError("the prompt is empty; say what to draw (use --guidance 0 for unconditional samples)")
    if not 0 <= args.guidance <= limits.MAX_GUIDANCE:  # NaN fails too
        raise CommandError(f"--guidance must be 0 or more and at most {limits.MAX_GUIDANCE:g} (a finite number), "
                           f"got {args.guidance}")
    if args.file is None:
        check_grid(args.n, args.size, args.upscale)
    if bool(args.image) != bool(args.controlnet):
        raise CommandError("--controlnet NAME needs --image HINT.png (one per ControlNet), and --image needs "
                           "--controlnet")
    if bool(args.ip_image) != bool(args.ip_adapter):
        raise CommandError("--ip-adapter NAME needs --ip-image IMAGE (the image prompt), and --ip-image needs "
                           "--ip-adapter")


def _languages_needed(args: argparse.Namespace, reg: Any, prompts: list[str]) -> tuple[list[str], list | None]:
    """The languages whose branches the prompts need, and the router's plans (``None`` with ``--lang``).

    A span routed to an untrained branch whose fallback is ``error`` stops here, before anything is loaded."""
    if args.lang is not None:
        return [reg.language(args.lang).code], None
    from polybridge.router import Router  # the router decides, prompt by prompt (and span by span)

    router = Router.from_registry(reg)
    plans = router.plan_many(list(dict.fromkeys(prompts)))
    every = plans + router.plan_many([args.negative or ""])
    for plan in every:
        for span in plan.problems():
            raise CommandError(f"{span.text!r} in {plan.prompt!r} is {span.language} ({span.how}), whose branch is "
                               f"not trained and whose fallback is 'error' ({reg.language(span.language).file}); "
                               f"train it with `polybridge train --lang {span.language}` or pass --lang")
    needed = list(dict.fromkeys(s.language for p in every for s in p.spans))
    if not args.json:
        for plan in plans[:3]:
            print(f"polybridge: routed {plan.prompt!r}: "
                  + (", ".join(f"{s.language} {s.text!r}" for s in plan.spans) or "no spans"), file=sys.stderr)
        if len(plans) > 3:
            print(f"polybridge: ... and {len(plans) - 3} more prompts (`polybridge route` shows each plan)",
                  file=sys.stderr)
    return needed, plans


def _announce_untrained(reg: Any, needed: list[str]) -> dict[str, str]:
    """``{code: fallback}`` for each needed language without trained branch weights, each said once on stderr."""
    untrained_codes = {}
    for code in needed:
        entry = reg.language(code)
        status = entry.status()
        if entry.branch is not None and status["branch"] != "present" and status["branch"] != "hub":
            untrained_codes[code] = entry.fallback
            print(f"polybridge: {code} has no trained branch yet ({entry.branch_source} is missing); "
                  f"following its fallback '{entry.fallback}'"
                  + (": the zero branch gives the backbone's image for an empty prompt, not your prompt"
                     if entry.fallback == "zero-branch" else ""), file=sys.stderr)
    return untrained_codes


def _draw(args: argparse.Namespace, pipeline_cls: Any, reg: Any, needed: list[str], prompts: list[str],
          sink: ResumableImages | None = None) -> list:
    """The images, in prompt order, ``--batch-size`` prompts per pipeline call; batch k seeded by its first index.
    With ``sink`` (``--file``), each batch goes there as it is drawn and batches an earlier run drew are skipped."""
    import warnings

    import torch
    from tqdm.auto import tqdm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice above says it once, plainly
        pipe = _with_plugins(args, pipeline_cls, reg, needed)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(language=args.lang, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  negative_prompt=args.negative, height=args.size, width=args.size)
    if args.branch_scale is not None:
        kwargs["branch_scale"] = args.branch_scale
    if args.image:
        kwargs["image"] = _hints(args.image, "--image")
    if args.ip_image:
        kwargs["ip_adapter_image"] = _hints([args.ip_image], "--ip-image")
    if args.english_prompt and args.lang != reg.backbone().language:  # routed prompts: appended to their English
        kwargs["english_prompt"] = args.english_prompt
    images = []
    batches = range(0, len(prompts), args.batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", disable=len(batches) < 2 or args.json):
        chunk = prompts[start:start + args.batch_size]
        if sink is not None and sink.done(start, len(chunk)):
            continue
        gen = torch.Generator().manual_seed(args.seed + start)
        drawn = pipe(chunk, generator=gen, **kwargs).images
        if sink is None:
            images.extend(drawn)
        else:
            sink.put(start, drawn)
    return images


def _resume_key(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    """What must match for a ``--file`` run to resume another's images: the prompts and every setting that
    changes an image (all arguments but where the images go and how the run reports)."""
    skip = {"out", "overwrite", "json", "threads", "func", "file"}
    return {"prompts": prompts, **{k: v for k, v in vars(args).items() if k not in skip and not callable(v)}}


def _with_plugins(args: argparse.Namespace, pipeline_cls: Any, reg: Any, needed: list[str]) -> Any:
    """The pipeline on ``--backbone`` (a registry backbone, or a checkpoint plugin on the default one), with the
    ``--ti``, ``--lora``, ``--controlnet`` and ``--ip-adapter`` plugins loaded."""
    from polybridge.plugins.use import use_plugins

    backbone, checkpoint = args.backbone, None
    if backbone is not None and backbone not in reg.backbones:
        kinds = [n for n, p in reg.plugins.items() if p.kind == "checkpoint"]
        if backbone not in kinds:
            raise CommandError(f"--backbone {backbone!r}: neither a backbone of {reg.file} ("
                               f"{', '.join(reg.backbones)}) nor a checkpoint plugin ({', '.join(kinds) or 'none'})")
        backbone, checkpoint = reg.plugins[backbone].backbone, backbone
    pipe = pipeline_cls.from_registry(reg, languages=needed, backbone=backbone)
    use_plugins(pipe, reg, loras=args.lora, controlnets=args.controlnet, tis=args.ti, checkpoint=checkpoint,
                ip_adapter=args.ip_adapter)
    return pipe


def _hints(paths: list[str], flag: str) -> Any:
    import PIL.Image

    images = []
    for path in paths:
        try:
            with PIL.Image.open(path) as im:
                images.append(im.copy())
        except OSError as exc:
            raise CommandError(f"{flag} {path}: cannot read it as an image ({exc})") from None
    return images if len(images) > 1 else images[0]


def _plugins_record(args: argparse.Namespace) -> dict[str, Any]:
    return {"lora": args.lora, "controlnet": args.controlnet, "ti": args.ti, "image": args.image,
            "ip_adapter": args.ip_adapter, "ip_image": args.ip_image}


def _write_images(args: argparse.Namespace, target: Path, images: list) -> list[str]:
    """One grid PNG at ``-o``, atomically (``--file``'s images go through :class:`ResumableImages`)."""
    import io

    from diffusers.utils import make_image_grid

    from polybridge.atomic import atomic_write_bytes

    cols = min(len(images), 4)
    rows = -(-len(images) // cols)
    blank = images[0].copy()
    blank.paste((0, 0, 0), (0, 0, blank.width, blank.height))
    grid = make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
    if args.upscale > 1:
        grid = grid.resize((grid.width * args.upscale, grid.height * args.upscale), resample=0)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(target, buf.getvalue())
    return [str(target)]


def add_commands(sub: Any) -> None:
    """``generate``."""
    p = sub.add_parser("generate", help="draw images from a prompt (or a file of prompts) in any registered language",
                       description="Generate with the backbone plus the language's branch. One prompt: an image "
                                   "grid of -n images (-o OUT.png). --file: one image per line into --out DIR "
                                   "(000000.png, 000001.png, ... in line order), batched.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (omit with --file)")
    p.add_argument("--lang", default=None, help="the prompt's language code (see `polybridge registry list`); "
                                                "default: the router decides per prompt (see `polybridge route`)")
    p.add_argument("-n", type=int_upto(limits.MAX_IMAGES), default=4, help="images for a single prompt (default 4)")
    p.add_argument("-o", "--output", default=None, help="image grid to write (PNG)")
    p.add_argument("--file", default=None, help="a UTF-8 file with one prompt per line")
    p.add_argument("--out", default=None, help="folder for --file's images (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder, or an existing -o file")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0); batch k uses seed + its first index")
    p.add_argument("--steps", type=int_upto(limits.MAX_INFERENCE_STEPS), default=25,
                   help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--negative", default=None, help="negative prompt (same language as the prompt)")
    p.add_argument("--english-prompt", default="",
                   help="English text for the backbone beside a native prompt (default \"\")")
    p.add_argument("--branch-scale", type=float_in(0, limits.MAX_BRANCH_SCALE), default=None,
                   help="scale of the branch (default: the entry's)")
    p.add_argument("--size", type=int_upto(limits.MAX_IMAGE_SIZE), default=None,
                   help="image side in pixels (default: the backbone's)")
    p.add_argument("--batch-size", type=int_upto(limits.MAX_BATCH_SIZE), default=16,
                   help="prompts per batch (default 16)")
    p.add_argument("--upscale", type=int_upto(limits.MAX_UPSCALE), default=4,
                   help="enlarge the grid by this factor, nearest-neighbour (default 4)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print what was run as JSON")
    _add_plugin_flags(p)
    p.set_defaults(func=cmd_generate)


def _add_plugin_flags(p: Any) -> None:
    """``--backbone``, ``--lora``, ``--controlnet``, ``--image``, ``--ti``, ``--ip-adapter``, ``--ip-image``: names
    from the registry."""
    p.add_argument("--backbone", default=None, help="a registry backbone, or a checkpoint plugin (default: "
                                                     "default_backbone); every branch is kept")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                   help="a LoRA plugin of the registry, with its scale (repeatable)")
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME",
                   help="a ControlNet plugin of the registry (repeatable; one --image each)")
    p.add_argument("--image", action="append", default=[], metavar="HINT.png", help="a ControlNet's hint image")
    p.add_argument("--ti", action="append", default=[], metavar="NAME", help="a Textual Inversion plugin (repeatable)")
    p.add_argument("--ip-adapter", default=None, metavar="NAME",
                   help="an IP-Adapter plugin of the registry (at its scale); its image prompt is --ip-image")
    p.add_argument("--ip-image", default=None, metavar="IMAGE", help="the IP-Adapter's image prompt (any image file)")
