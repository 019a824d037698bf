"""``polybridge registry add``: scaffold a new language from commented templates, all or nothing.

The new folder (its entry, a starter grammar and the router's seed words made from it) is written beside
``languages/`` under a temporary name, validated (entry and grammar), and only then renamed into place and
appended to ``registry.yaml``; if anything fails, nothing is left behind and ``registry.yaml`` is unchanged.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from string import Template
from typing import Sequence

import yaml

from polybridge import catalog
from polybridge.atomic import atomic_dir, atomic_write_text
from polybridge.registry import (
    CODE_PATTERN,
    LANGUAGE_FILE,
    Registry,
    RegistryError,
    load_language,
    load_registry,
    read_yaml,
)
from polybridge.unicode_scripts import KNOWN_SCRIPTS

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _yaml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(items) + "]"


def render_language_yaml(code: str, name: str, native_name: str | None, scripts: Sequence[str],
                         branch_type: str, concepts: Sequence[str]) -> str:
    """The commented ``language.yaml`` for a new language."""
    template = Template((TEMPLATES / "language.yaml").read_text(encoding="utf-8"))
    return template.substitute(code=code, name=name, native_name=native_name or name, scripts=_yaml_list(scripts),
                               branch_type=branch_type, concepts=_yaml_list(concepts))


def render_grammar_yaml(code: str, name: str, concepts: Sequence[str]) -> str:
    """A commented starter grammar: English words marked for translation, valid as written."""
    template = Template((TEMPLATES / "grammar.yaml").read_text(encoding="utf-8"))
    concept_words = "".join(f"    {c}: {{text: [{c.replace('_', ' ')}]}}   # TODO: this language's word\n"
                            for c in concepts)
    return template.substitute(code=code, name=name, concept_words=concept_words)


def append_language_to_registry_text(text: str, code: str) -> str:
    """``registry.yaml`` text with ``code`` appended to ``languages:``, comments and layout kept."""
    before = (yaml.safe_load(text) or {}).get("languages") or []
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^languages\s*:", line)), None)
    if start is None:
        new = text.rstrip("\n") + f"\n\nlanguages:\n  - {code}\n"
    elif re.match(r"^languages\s*:\s*\[", lines[start]):
        lines[start] = re.sub(r"\]", f", {code}]" if before else f"{code}]", lines[start], count=1)
        new = "".join(lines)
    else:
        last, indent = start, "  "
        for i in range(start + 1, len(lines)):
            m = re.match(r"^(\s+)-\s", lines[i])
            if m:
                last, indent = i, m.group(1)
            elif lines[i].strip() and not lines[i].lstrip().startswith("#"):
                break
        if not lines[last].endswith("\n"):
            lines[last] += "\n"
        lines.insert(last + 1, f"{indent}- {code}\n")
        new = "".join(lines)
    after = (yaml.safe_load(new) or {}).get("languages") or []
    if list(after) != [*before, code]:
        raise RegistryError("registry.yaml", "languages", "could not append the new code automatically; "
                            f"add '- {code}' to the languages list by hand")
    return new


def add_language(registry: Registry, code: str, *, name: str, native_name: str | None = None,
                 scripts: Sequence[str] = ("Latin",), branch_type: str = "bdm",
                 concepts: Sequence[str] = ()) -> Path:
    """Create ``languages/<code>/`` and register it. Returns the new folder."""
    from polybridge.seed_words import SEED_WORDS_FILE, render_seed_words
    from polybridge.synthetic.grammar import load_grammar
    from polybridge.synthetic.world import CONCEPTS

    if not CODE_PATTERN.match(code):
        raise RegistryError(registry.file, "languages", f"{code!r} is not a language code (ISO 639, e.g. 'pt', 'pt-BR')")
    if code in registry.languages:
        raise RegistryError(registry.file, "languages", f"{code!r} is already registered", valid=None)
    folder = registry.root / "languages" / code
    if folder.exists():
        raise RegistryError(folder, None, "folder already exists; remove it or register it by hand")
    for script in scripts:
        if script not in KNOWN_SCRIPTS:
            raise RegistryError("--scripts", None, f"unknown script {script!r}", valid=KNOWN_SCRIPTS)
    if branch_type not in catalog.names("branch"):
        raise RegistryError("--branch", None, f"unknown branch type {branch_type!r}", valid=catalog.names("branch"))
    owned = {c: e.code for e in registry.languages.values() for c in (e.synthetic.concepts if e.synthetic else ())}
    for concept in concepts:
        if concept not in CONCEPTS:
            raise RegistryError("--concepts", None, f"unknown concept {concept!r}", valid=CONCEPTS)
        if concept in owned:
            raise RegistryError("--concepts", None, f"{concept!r} is already owned by {owned[concept]!r}",
                                valid=[c for c in CONCEPTS if c not in owned])

    registry_text = registry.file.read_text(encoding="utf-8")
    new_registry_text = append_language_to_registry_text(registry_text, code)
    with atomic_dir(folder) as tmp:
        (tmp / LANGUAGE_FILE).write_text(
            render_language_yaml(code, name, native_name, scripts, branch_type, concepts), encoding="utf-8")
        (tmp / "grammar.yaml").write_text(render_grammar_yaml(code, name, concepts), encoding="utf-8")
        grammar = load_grammar(tmp / "grammar.yaml", code, concepts)
        (tmp / SEED_WORDS_FILE).write_text(render_seed_words(code, name, tmp, grammar), encoding="utf-8")
        load_language(tmp, code)
    try:
        atomic_write_text(registry.file, new_registry_text)
        load_registry(registry.file)
    except BaseException:
        atomic_write_text(registry.file, registry_text)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def copy_registry(source: str | Path, dest: str | Path, artifacts: bool | Sequence[str] = False) -> Path:
    """Copy ``registry.yaml`` and every ``languages/<code>/`` (entries, grammars and other files) from the
    registry folder ``source`` into ``dest``; built artifacts (subfolders: encoder, tokenizer, branch, ...) too
    with ``artifacts=True``, or only for the codes listed. Returns the new ``registry.yaml`` (a writable
    copy to experiment on: tests, benchmarks). The curated benchmark prompt files that entries name
    (``benchmarks/prompts/``) come along, so the copy validates."""
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    text = (source / "registry.yaml").read_text(encoding="utf-8")
    plugins = (read_yaml(source / "registry.yaml") or {}).get("plugins") or {}
    for spec in plugins.values():  # plugins stay where they are: local sources become absolute
        local = spec.get("source") if isinstance(spec, dict) else None
        if isinstance(local, str) and local.startswith("./"):
            text = text.replace(f"source: {local}\n", f"source: {(source / local).resolve()}\n")
    (dest / "registry.yaml").write_text(text, encoding="utf-8")
    if (source / "benchmarks" / "prompts").is_dir():
        shutil.copytree(source / "benchmarks" / "prompts", dest / "benchmarks" / "prompts", dirs_exist_ok=True)
    for folder in sorted((source / "languages").iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        target = dest / "languages" / folder.name
        target.mkdir(parents=True)
        with_folders = artifacts if isinstance(artifacts, bool) else folder.name in artifacts
        for item in folder.iterdir():
            if item.is_file():
                shutil.copy(item, target / item.name)
            elif with_folders:
                shutil.copytree(item, target / item.name)
    return dest / "registry.yaml"
