"""``polybridge route``: how prompts are split into language spans and where each span goes."""

from __future__ import annotations

import argparse
from typing import Any

from polybridge.cli.common import CommandError, print_json, printable, read_prompt_file, registry_of, table


def _target_words(span: Any) -> str:
    if span.target == "backbone":
        return "backbone text encoder"
    if span.target == "branch":
        return f"{span.language} branch" + ("" if span.trained else " (untrained: zero branch, no effect)")
    if span.target == "error":
        return f"error: {span.language} has no trained branch and its fallback is 'error'"
    return span.target


def cmd_route(args: argparse.Namespace) -> int:
    from polybridge.router import Router

    if (args.prompt is None) == (args.file is None):
        raise CommandError("give either a PROMPT or --file PROMPTS.txt (not both)")
    reg = registry_of(args)
    router = Router.from_registry(reg)
    plans = router.plan_many(read_prompt_file(args.file) if args.file else [args.prompt])
    if args.json:
        print_json([p.to_dict() for p in plans] if args.file else plans[0].to_dict())
        return 0
    for i, plan in enumerate(plans):
        if i:
            print()
        print(printable(plan.prompt) if plan.prompt.strip() else repr(plan.prompt))
        if not plan.spans:
            print('  no spans (empty prompt): the backbone reads ""')
            continue
        rows = [[printable(s.text), s.language + (f" (detected {s.detected})" if s.detected else ""),
                 f"{s.confidence:.2f}", s.how, _target_words(s)] for s in plan.spans]
        print("\n".join("  " + line for line in table(rows, ["span", "language", "confidence", "how",
                                                             "goes to"]).splitlines()))
        if plan.is_mixed or len({s.target for s in plan.spans}) > 1:
            print(f"  backbone reads: {plan.backbone_text!r}")
            for code, text in plan.branch_texts.items():
                print(f"  {code} branch reads: {text!r}")
    return 0


def add_commands(sub: Any) -> None:
    """``route``."""
    p = sub.add_parser("route", help="show how prompts are routed: language spans, confidence, which branch",
                       description="Split each prompt into language spans (Unicode-script rules, then lingua for "
                                   "Latin-script text) and show each span's language, confidence, how it was "
                                   "decided and where it goes (the backbone's text encoder or a language's branch), "
                                   "with the registry's fallbacks applied. `polybridge generate` without --lang "
                                   "routes the same way.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (omit with --file)")
    p.add_argument("--file", default=None, help="a UTF-8 file with one prompt per line")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (a list of plans with --file)")
    p.set_defaults(func=cmd_route)
