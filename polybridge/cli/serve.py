"""``polybridge serve``: the HTTP service and its page (:mod:`polybridge.serve`), on uvicorn."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from polybridge.cli.common import CommandError, positive_int, registry_of, words


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from polybridge.serve.app import ServeOptions, create_app
    except ImportError as exc:
        raise CommandError(f"polybridge serve needs FastAPI and uvicorn ({exc.name} is missing): "
                           "pip install -e '.[serve]'") from None
    if args.max_wait_ms < 0:
        raise CommandError(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms}")
    import warnings

    import torch

    from polybridge.pipeline import PolyBridgePipeline

    reg = registry_of(args)
    codes = words(args.languages) or None
    if codes is not None:
        codes = [reg.language(code).code for code in codes]  # unknown codes: one line listing the valid ones
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"polybridge: loading {reg.default_backbone} and {', '.join(codes) if codes else 'every registered language'}",
          file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = PolyBridgePipeline.from_registry(reg, languages=codes, device=args.device)
    for w in caught:
        if "UNTRAINED" in str(w.message) or "untrained" in str(w.message):
            print(f"polybridge: {str(w.message).split('. ')[0]}", file=sys.stderr)
    pipe.set_progress_bar_config(disable=True)
    from polybridge.plugins.use import load_served_plugins

    for name, why in load_served_plugins(pipe, reg, args.plugins).items():
        print(f"polybridge: plugin {name!r} is not served: {why}", file=sys.stderr)
    app = create_app(pipe, ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                        max_queue=args.max_queue))
    print(f"polybridge: serving on http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_commands(sub: Any) -> None:
    """``serve``."""
    p = sub.add_parser("serve", help="serve every loaded language over HTTP: a JSON API, its docs and a page",
                       description="Load the backbone once with each language's encoder and branch, and serve "
                                   "POST /api/generate, POST /api/route, /docs, /health, /metrics and a page at /. "
                                   "Requests in different languages are batched into one pipeline call (up to "
                                   "--max-batch images, waiting at most --max-wait-ms for more); the model runs "
                                   "in one worker thread; a full queue answers 503 with Retry-After.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--languages", nargs="+", default=None, metavar="CODE",
                   help="languages to load (default: every registered one), e.g. --languages zh ja")
    p.add_argument("--max-batch", type=positive_int, default=16, help="images in one pipeline call (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=50.0,
                   help="how long the oldest request waits for others to share its call (default 50)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting before the server answers 503 (default 256)")
    p.add_argument("--plugins", nargs="+", default=None, metavar="NAME",
                   help="LoRA and Textual Inversion plugins of the registry that requests may choose (default: every "
                        "one that fits the backbone)")
    p.add_argument("--device", default=None, help="torch device (default: CPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=cmd_serve)
