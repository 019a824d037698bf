"""``polybridge registry``: list, show, validate and add languages."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from polybridge.cli.common import print_json, registry_of, table


def _entry_summary(entry) -> dict[str, Any]:
    return {
        "code": entry.code,
        "name": entry.name,
        "native_name": entry.native_name,
        "scripts": list(entry.scripts),
        "branch": entry.branch.type if entry.branch else "(backbone)",
        "concepts": list(entry.synthetic.concepts) if entry.synthetic else [],
        "status": entry.status(),
        "fallback": entry.fallback,
    }


def cmd_registry_list(args: argparse.Namespace) -> int:
    reg = registry_of(args)
    summaries = [_entry_summary(e) for e in reg.languages.values()]
    if args.json:
        print_json({"registry": str(reg.file), "default_backbone": reg.default_backbone, "languages": summaries,
                    "plugins": [_plugin_summary(p) for p in reg.plugins.values()]})
        return 0
    rows = [[s["code"], s["name"], s["native_name"] or "", ",".join(s["scripts"]), s["branch"],
             s["status"]["tokenizer"], s["status"]["encoder"], s["status"]["branch"], ",".join(s["concepts"])]
            for s in summaries]
    print(f"registry: {reg.file}  (default backbone: {reg.default_backbone})")
    print(table(rows, ["code", "name", "native", "scripts", "branch", "tokenizer", "encoder", "weights", "concepts"]))
    if reg.plugins:
        print(f"plugins ({len(reg.plugins)}):")
        print(table([[s["name"], s["kind"], s["backbone"], s["source"], s["description"]]
                     for s in map(_plugin_summary, reg.plugins.values())],
                    ["plugin", "kind", "backbone", "source", "description"]))
    return 0


def _plugin_summary(spec) -> dict[str, Any]:
    return {"name": spec.name, "kind": spec.kind, "backbone": spec.backbone, "source": spec.source,
            "description": spec.description}


def cmd_registry_show(args: argparse.Namespace) -> int:
    import dataclasses

    entry = registry_of(args).language(args.code)
    data = dataclasses.asdict(entry)
    data["status"] = entry.status()
    if args.json:
        print_json(data)
    else:
        import yaml

        print(f"# {entry.file}")
        print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), allow_unicode=True, sort_keys=False).rstrip())
    return 0


def cmd_registry_validate(args: argparse.Namespace) -> int:
    from polybridge.synthetic.captions import load_grammars

    reg = registry_of(args)
    grammars = load_grammars(reg)
    report = {code: {"entry": "ok", "grammar": "ok" if code in grammars else "none", **entry.status()}
              for code, entry in reg.languages.items()}
    warnings = [f"{entry.file}: encoder.trust_remote_code is true: loading {entry.encoder.source} runs Python code "
                "from that repository on this machine; keep it only for a repository you trust"
                for entry in reg.languages.values() if entry.encoder is not None and entry.encoder.trust_remote_code]
    for line in warnings:
        print(f"polybridge: WARNING: {line}", file=sys.stderr)
    from polybridge.plugins.use import check_plugin

    plugins = {name: check_plugin(reg, name) for name in reg.plugins}
    if args.json:
        print_json({"registry": str(reg.file), "valid": True, "warnings": warnings, "languages": report,
                    "plugins": plugins})
    else:
        print(f"{reg.file}: valid ({len(reg.languages)} languages, {len(reg.backbones)} backbones)")
        rows = [[c, r["entry"], r["grammar"], r["tokenizer"], r["encoder"], r["branch"]] for c, r in report.items()]
        print(table(rows, ["code", "entry", "grammar", "tokenizer", "encoder", "weights"]))
        if plugins:
            print(table([[n, reg.plugins[n].kind, state] for n, state in plugins.items()], ["plugin", "kind", "state"]))
    return 0


def cmd_registry_add(args: argparse.Namespace) -> int:
    from polybridge.scaffold import add_language

    reg = registry_of(args)
    folder = add_language(reg, args.code, name=args.name, native_name=args.native_name, scripts=args.scripts,
                          branch_type=args.branch, concepts=args.concepts)
    print(f"added {args.code!r}: {folder}")
    print(f"next: edit {folder / 'language.yaml'} and {folder / 'grammar.yaml'}, then "
          f"`polybridge registry validate` and `polybridge tokenizer build --lang {args.code}`")
    return 0


def add_commands(sub: Any) -> None:
    """``registry list|show|validate|add``."""
    p_reg = sub.add_parser("registry", help="list, show, validate and add languages",
                           description="The language registry: registry.yaml plus languages/<code>/language.yaml.")
    reg_sub = p_reg.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    p = reg_sub.add_parser("list", help="one line per registered language, with what is built")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_registry_list)
    p = reg_sub.add_parser("show", help="one language's whole entry")
    p.add_argument("code", help="language code, e.g. zh")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=cmd_registry_show)
    p = reg_sub.add_parser("validate", help="parse every entry and grammar; exit 2 naming the first problem")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_registry_validate)
    p = reg_sub.add_parser("add", help="scaffold languages/CODE/ from a commented template that validates as written",
                           description="Create languages/CODE/language.yaml and grammar.yaml from templates and "
                                       "register CODE in registry.yaml. Nothing is written if anything fails.")
    p.add_argument("code", help="ISO 639 code of the new language, e.g. pt or pt-BR")
    p.add_argument("--name", required=True, help="English name, e.g. Portuguese")
    p.add_argument("--native-name", default=None, help="the language's own name for itself, e.g. Português")
    p.add_argument("--scripts", nargs="+", default=["Latin"], metavar="SCRIPT",
                   help="Unicode scripts it is written in (default: Latin)")
    p.add_argument("--branch", default="bdm", help="branch type: bdm or pea (default: bdm)")
    p.add_argument("--concepts", nargs="*", default=[], metavar="CONCEPT",
                   help="culture-specific concepts of the synthetic world that this language owns")
    p.set_defaults(func=cmd_registry_add)
