"""The benchmark report: ``report.md`` and a self-contained ``report.html`` (images embedded), plus
``results.json``, the image grids (``images/``) and the bar plots (``plots/``), written as one folder atomically.

Both documents come from one list of blocks (headings, paragraphs, tables, images), so they always say the
same thing. The Markdown links the PNGs beside it; the HTML embeds them as data URIs and needs nothing else.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polybridge.bench.metrics import LOWER_IS_BETTER, METRIC_HELP
from polybridge.bench.plugins import EFFECT_HELP, ENGLISH_METHOD, PLUGIN_SUITE
from polybridge.bench.runner import METHOD_HELP, METHODS, BenchResult, Cell, Grid
from polybridge.bench.suites import SUITES

#: Metric columns of the detailed tables, per kind of suite.
SYNTHETIC_COLUMNS: tuple[str, ...] = ("accuracy", "shape", "colour", "size", "position", "background", "scene",
                                      "concept", "clip_t", "clip_i", "fid")
CURATED_COLUMNS: tuple[str, ...] = ("clip_t",)
SUITE_HELP: dict[str, str] = {
    "general": "synthetic scenes of generic shapes, the same scenes for every language (ground truth: the scene)",
    "culture": "synthetic scenes showing the language's own culture-specific objects, named natively "
               "(ground truth: the scene)",
    "curated": "hand-written native prompts in MC-18's six categories, scored with the entry's CLIP model",
}
GROUND_TRUTH = "ground truth"
PLUGIN_COLUMNS: tuple[str, ...] = ("effect", "content", "joint", "content_mean", "english_effect", "english_content",
                                   "english_joint", "compatibility")


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail before any work when ``out`` cannot be written: its parent is not a writable folder, it is a file,
    or it is a non-empty folder and ``overwrite`` is off (:func:`polybridge.atomic.check_dir_target`)."""
    from polybridge.atomic import check_dir_target

    return check_dir_target(out, overwrite)


# --------------------------------------------------------------------------- the document model


@dataclass
class _Image:
    path: str  # relative to the report
    alt: str
    data: bytes


Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", _Image) | ("ul", items)


def _fmt(value: Any, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1f}" if metric in ("clip_t", "clip_i", "fid") else f"{value:.3f}"
    return str(value)


def _cell_map(cells: Sequence[Cell]) -> dict[tuple[str, str, str], Cell]:
    """The per-language suites' cells by (suite, language, method) (the plugins suite's have a row key too)."""
    return {(c.suite, c.language, c.method): c for c in cells if c.plugin is None}


def _headline(suite: str) -> str:
    return "clip_t" if suite == "curated" else "accuracy"


def build_blocks(result: BenchResult, images: dict[str, bytes]) -> list[Block]:
    """The report as blocks; ``images`` gathers the PNG files it refers to (relative path -> bytes)."""
    s = result.settings
    cells = _cell_map(result.cells)
    languages, methods = s["languages"], [m for m in METHODS if m in s["methods"]]
    suites = [x for x in SUITES if x in s["suites"] and x != PLUGIN_SUITE]
    ran = [c for c in result.cells if c.status == "ok"]
    blocks: list[Block] = [
        ("h", 1, "polybridge benchmark"),
        ("p", f"{result.started}: {len(ran)} of {len(result.cells)} cells ran ({len(languages)} languages x "
              f"{len(suites)} suites x {len(methods)} methods"
              f"{', plus the plugins suite' if PLUGIN_SUITE in s['suites'] else ''}) in {result.seconds:.0f} s "
              f"({result.seconds / 60:.1f} min, models loaded in {s['load_seconds']} s) on backbone "
              f"{s['backbone']} ({s['backbone_source']}), {'quick run' if s['quick'] else 'full run'}."),
    ]
    for note in result.notes:
        blocks.append(("p", note))

    # The cross-language tables.
    blocks.append(("h", 2, "Cross-language results"))
    for suite in suites:
        headline = _headline(suite)
        blocks.append(("h", 3, f"{suite}: {headline}"))
        blocks.append(("p", f"{SUITE_HELP[suite]}. Cells: {METRIC_HELP[headline]}."))
        rows = []
        for code in languages:
            row = [code]
            for method in methods:
                cell = cells.get((suite, code, method))
                row.append(_fmt(cell.metrics.get(headline), headline) if cell and cell.status == "ok" else "skipped")
            rows.append(row)
        blocks.append(("table", ["language", *methods], rows))
        plot = _plot(result, suite, languages, methods)
        if plot is not None:
            path = f"plots/{suite}.png"
            images[path] = plot
            blocks.append(("img", _Image(path, f"{suite}: bar plots per metric", plot)))

    # The detailed tables.
    blocks.append(("h", 2, "All metrics"))
    for suite in suites:
        columns = CURATED_COLUMNS if suite == "curated" else SYNTHETIC_COLUMNS
        if suite == "general":
            columns = tuple(c for c in columns if c != "concept")
        rows = []
        for code in languages:
            for method in methods:
                cell = cells.get((suite, code, method))
                if cell is None or cell.status != "ok":
                    continue
                rows.append([code, method, *(_fmt(cell.metrics.get(c), c) for c in columns), str(cell.n),
                             f"{cell.seconds:.1f}" + (" (shared)" if "shared_with" in cell.metrics else "")])
        blocks.append(("h", 3, suite))
        if rows:
            blocks.append(("table", ["language", "method", *columns, "n", "seconds"], rows))
        else:
            blocks.append(("p", "No cell of this suite ran (see Skipped)."))
        if suite == "culture":
            blocks.extend(_per_concept(result, languages, methods))
        if suite == "curated":
            blocks.extend(_per_category(result, languages, methods))

    if PLUGIN_SUITE in s["suites"]:
        blocks.extend(_plugin_blocks(result, images))

    # The image grids.
    blocks.append(("h", 2, "Images"))
    blocks.append(("p", "Each grid: one column per prompt (the first of the suite), one row per method, the rendered "
                        "ground truth on top (synthetic suites); the same seed in every row of a column."))
    for grid in result.grids:
        if grid.plugin is not None or len(grid.rows) <= (1 if GROUND_TRUTH in grid.rows else 0):
            continue
        path = f"images/{grid.suite}-{grid.language}.png"
        images[path] = _grid_png(grid)
        blocks.append(("h", 3, f"{grid.suite}, {grid.language}"))
        blocks.append(("img", _Image(path, f"{grid.suite} {grid.language}: rows {', '.join(grid.rows)}", images[path])))
        header = ["#", "prompt", "english"] + [k for k in ("translation", "category") if k in grid.inputs]
        rows = [[str(i), grid.inputs["prompt"][i], grid.inputs["english"][i],
                 *(grid.inputs[k][i] for k in ("translation", "category") if k in grid.inputs)]
                for i in range(len(grid.inputs["prompt"]))]
        blocks.append(("table", header, rows))

    # What was skipped, and why.
    skipped = [c for c in result.cells if c.status != "ok"]
    blocks.append(("h", 2, "Skipped"))
    if not skipped:
        blocks.append(("p", "Nothing: every cell ran."))
    else:
        grouped: dict[tuple[str, str], list[str]] = {}
        for c in skipped:
            grouped.setdefault((c.language, c.reason), []).append(
                f"{c.suite}/{c.method}" + (f"/{c.plugin}" if c.plugin is not None else ""))
        blocks.append(("ul", [f"{code} ({', '.join(which)}): {reason}" for (code, reason), which in grouped.items()]))

    # Settings and definitions.
    blocks.append(("h", 2, "Settings and seeds"))
    rows = [[k, json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)] for k, v in s.items()]
    blocks.append(("table", ["setting", "value"], rows))
    blocks.append(("h", 2, "Methods and metrics"))
    blocks.append(("ul", [f"{m}: {METHOD_HELP[m]}" for m in methods]
                   + [f"{k}: {v}" + (" (lower is better)" if k in LOWER_IS_BETTER and "lower" not in v else "")
                      for k, v in METRIC_HELP.items()]))
    return blocks


def plugin_table(result: BenchResult, metric: str = "compatibility") -> tuple[list[str], list[list[str]]]:
    """The plugins table: a row per side that ran (English, then each language x method), a column per plugin row.
    A native cell: ``metric`` (effect / content); the English row: its joint rate (effect / content); a cell that did
    not run: ``skipped`` (the reasons are in the report's Skipped list)."""
    plugin_cells = [c for c in result.cells if c.plugin is not None]
    rows_order = list(dict.fromkeys(c.plugin for c in plugin_cells))
    sides = list(dict.fromkeys((c.language, c.method) for c in plugin_cells if c.status == "ok"))
    by = {(c.language, c.method, c.plugin): c for c in plugin_cells}
    out = []
    for code, method in sides:
        english = method == ENGLISH_METHOD
        row = [f"{code} (English prompts)" if english else f"{code} {method}"]
        for plugin in rows_order:
            c = by.get((code, method, plugin))
            if c is None or c.status != "ok":
                row.append("skipped")
                continue
            m = c.metrics
            head = _fmt(m.get("joint" if english else metric))
            row.append(f"{head} ({_fmt(m.get('effect'))} / {_fmt(m.get('content'))})")
        out.append(row)
    return ["side", *rows_order], out


def _plugin_blocks(result: BenchResult, images: dict[str, bytes]) -> list[Block]:
    s = result.settings
    seed = s.get("plugin_scene_seed", {})
    blocks: list[Block] = [
        ("h", 2, "Plugins"),
        ("p", "Each plugin (and each scheduler swap) applied as a user would, to the same scenes drawn with English "
              "prompts (the backbone alone: the English caption plus the plugin's words) and with native prompts "
              "through each trained branch (the native caption, the plugin's words as the English part). One scene "
              f"set per row, the same for every language (seed {seed.get('seed')}, split {seed.get('split')}, "
              f"{s.get('plugin_scenes_per_row')} scenes), so the English side runs once per row and every language is "
              "compared with it. Read back by the plugin scorer on the ground truth."),
        ("ul", [f"effect: {name}: {text}" for name, text in EFFECT_HELP.items()]
         + ["content: share of images with every attribute the prompt asks for right, the plugin's own aside "
            "(style and none: shape, colour, size, position, background; layout: shape, colour, background; unnamed: "
            "colour, size, position, background; background: shape, colour, size, position)",
            "joint: share of images with the effect and the content both right (content where there is no effect)",
            "compatibility = native joint / English joint (n/a when English draws none right)"]),
        ("p", "Cells: compatibility (effect / content); the English row: its joint rate (effect / content)."),
    ]
    header, rows = plugin_table(result)
    blocks.append(("table", header, rows) if rows else ("p", "No plugin cell ran (see Skipped)."))
    detail = []
    for c in result.cells:
        if c.plugin is None or c.status != "ok":
            continue
        m = c.metrics
        detail.append([c.plugin, c.language, c.method, *(_fmt(m.get(k)) for k in PLUGIN_COLUMNS), str(c.n),
                       f"{c.seconds:.1f}"])
    if detail:
        blocks.append(("h", 3, "All plugin figures"))
        blocks.append(("table", ["plugin", "language", "method", *PLUGIN_COLUMNS, "n", "seconds"], detail))
    for grid in result.grids:
        if grid.plugin is None:
            continue
        path = f"images/plugins-{grid.plugin}.png"
        images[path] = _grid_png(grid)
        blocks.append(("h", 3, f"plugins, {grid.plugin}"))
        blocks.append(("img", _Image(path, f"plugins {grid.plugin}: rows {', '.join(grid.rows)}", images[path])))
        width = max((len(v) for v in grid.inputs.values()), default=0)
        blocks.append(("table", ["prompts", *map(str, range(width))], [[k, *v] for k, v in grid.inputs.items()]))
    return blocks


def _per_concept(result: BenchResult, languages: Sequence[str], methods: Sequence[str]) -> list[Block]:
    rows = []
    for c in result.cells:
        if c.suite == "culture" and c.status == "ok" and c.metrics.get("per_concept"):
            rows.append([c.language, c.method, ", ".join(f"{k} {_fmt(v)}" for k, v in c.metrics["per_concept"].items())])
    order = {(code, m): i for i, (code, m) in enumerate((code, m) for code in languages for m in methods)}
    rows.sort(key=lambda r: order.get((r[0], r[1]), 0))
    return [("p", "Per-concept shape accuracy (culture suite):"), ("table", ["language", "method", "concepts"], rows)] \
        if rows else []


def _per_category(result: BenchResult, languages: Sequence[str], methods: Sequence[str]) -> list[Block]:
    rows = []
    for c in result.cells:
        if c.suite == "curated" and c.status == "ok":
            rows.append([c.language, c.method, c.metrics.get("clip_model", ""),
                         ", ".join(f"{k} {_fmt(v, 'clip_t')}" for k, v in c.metrics.get("per_category", {}).items())])
    return [("p", "CLIPScore per MC-18 category (curated suite):"),
            ("table", ["language", "method", "CLIP model", "categories"], rows)] if rows else []


# --------------------------------------------------------------------------- pictures


def _grid_png(grid: Grid, target: int = 96) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    labels = list(grid.rows)
    cols = max(len(v) for v in grid.rows.values())
    side = max(im.size[0] for v in grid.rows.values() for im in v)
    scale = max(1, target // side)
    cell, pad, label_w, top = side * scale, 4, 130, 18
    canvas = Image.new("RGB", (label_w + cols * (cell + pad) + pad, top + len(labels) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j in range(cols):
        draw.text((label_w + pad + j * (cell + pad) + cell // 2 - 4, 3), str(j), fill="black", font=font)
    for i, label in enumerate(labels):
        y = top + pad + i * (cell + pad)
        draw.text((6, y + cell // 2 - 6), label, fill="black", font=font)
        for j, im in enumerate(grid.rows[label]):
            im = im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(im, (label_w + pad + j * (cell + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _plot(result: BenchResult, suite: str, languages: Sequence[str], methods: Sequence[str]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["clip_t"] if suite == "curated" else ["accuracy", *(["concept"] if suite == "culture" else []),
                                                      "clip_t", "clip_i", "fid"]
    cells = _cell_map(result.cells)
    ran_methods = [m for m in methods if any((c := cells.get((suite, code, m))) and c.status == "ok"
                                             for code in languages)]
    if not ran_methods:
        return None
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.9 * len(languages) * max(1, len(ran_methods)) / 2.5),
                                                       2.4 * len(metrics)), squeeze=False)
    width = 0.8 / len(ran_methods)
    for ax, metric in zip(axes[:, 0], metrics):
        for k, method in enumerate(ran_methods):
            values = []
            for code in languages:
                c = cells.get((suite, code, method))
                v = c.metrics.get(metric) if c is not None and c.status == "ok" else None
                values.append(float("nan") if v is None else float(v))
            ax.bar([i + (k - (len(ran_methods) - 1) / 2) * width for i in range(len(languages))], values, width,
                   label=method)
        ax.set_xticks(range(len(languages)), languages)
        ax.set_ylabel(metric + (" (lower better)" if metric in LOWER_IS_BETTER else ""))
        if metric in ("accuracy", "concept"):
            ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(f"{suite} suite")
    fig.legend(handles, labels, fontsize=8, ncols=min(len(ran_methods), 5), loc="upper center",
               bbox_to_anchor=(0.5, 0.97), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("| " + " | ".join(map(_md_cell, header)) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(map(_md_cell, row)) + " |" for row in rows)
        elif kind == "img":
            out.append(f"![{block[1].alt}]({block[1].path})")
        elif kind == "ul":
            out.extend(f"- {item}" for item in block[1])
        out.append("")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def to_html(blocks: Sequence[Block]) -> str:
    esc = html.escape
    out = ["<!doctype html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           "<title>polybridge benchmark</title>", f"<style>{_CSS}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{esc(block[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in block[1]) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            out.append("</table>")
        elif kind == "img":
            data = base64.b64encode(block[1].data).decode("ascii")
            out.append(f"<p><img alt=\"{esc(block[1].alt)}\" src=\"data:image/png;base64,{data}\"></p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{esc(str(i))}</li>" for i in block[1]) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(result: BenchResult, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out/`` (report.md, report.html, results.json, images/, plots/) whole, or nothing at all."""
    from polybridge.atomic import atomic_dir

    images: dict[str, bytes] = {}
    blocks = build_blocks(result, images)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for rel, data in images.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(blocks), encoding="utf-8")
        (tmp / "results.json").write_text(json.dumps(result.table(), ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
    return out
