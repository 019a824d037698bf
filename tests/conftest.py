"""Shared fixtures: a writable copy of the real registry, so tests can add and break languages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Tiny models: one thread avoids OpenMP spin-waiting (10-20x slower under load, measured).
torch.set_num_threads(1)


def copy_registry(dest: Path, with_artifacts: bool = False) -> Path:
    """Copy registry.yaml and every languages/<code>/ (entries and grammars; built artifacts on request)."""
    from polybridge.scaffold import copy_registry as copy

    return copy(REPO, dest, artifacts=with_artifacts)


def registry_with_tiny_backbone(dest: Path, components: dict | None = None) -> Path:
    """A copy of the real registry (entries, grammars, tokenizers, native encoders) whose default backbone is
    the tiny random one of ``tiny_components`` (16x16 images; ``components``: another one, e.g. the tiny SDXL),
    saved in diffusers format at ``dest/model``."""
    from tiny_components import get_dummy_components, save_backbone

    registry = copy_registry(dest, with_artifacts=True)
    for folder in (dest / "languages").glob("*/*"):
        if folder.is_dir() and folder.name not in ("encoder", "tokenizer"):
            shutil.rmtree(folder)  # trained branches belong to the real backbone, not to this one
    architecture = save_backbone(components or get_dummy_components(), dest / "model")
    text = registry.read_text(encoding="utf-8")
    old = "source: ./polybridge/assets/polybridge-tiny\n    architecture: sd1"
    assert old in text
    registry.write_text(text.replace(old, f"source: ./model\n    architecture: {architecture}"), encoding="utf-8")
    return registry


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    """Path of a registry.yaml in tmp_path: a copy of the real one without built weights."""
    return copy_registry(tmp_path / "repo")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed (as diffusers' fast tests do)."""
    torch.manual_seed(0)


def point_at_parquet(registry: Path, code: str, rows: int, *, files: int = 2, streaming: bool = True,
                     **data_keys) -> Path:
    """Make ``code``'s entry train on a folder of ``files`` parquet files of ``rows`` image/caption rows of varied sizes
    (``caption_<code>``, ``caption_en``), written next to its language.yaml."""
    import datasets
    import numpy as np
    import yaml
    from PIL import Image

    folder = registry.parent / "languages" / code
    rng = np.random.default_rng(0)
    images, captions, english = [], [], []
    for i in range(rows):
        w, h = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        buf = __import__("io").BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        captions.append(f"图 {i} 红色的圆")
        english.append(f"picture {i} a red circle" if i % 3 else None)
    ds = datasets.Dataset.from_dict({"image": images, f"caption_{code}": captions, "caption_en": english},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                f"caption_{code}": datasets.Value("string"),
                                                                "caption_en": datasets.Value("string")}))
    (folder / "pairs").mkdir(exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        ds.select(range(f * per, min(rows, (f + 1) * per))).to_parquet(str(folder / "pairs" / f"{f:05d}.parquet"))
    entry_file = folder / "language.yaml"
    entry = yaml.safe_load(entry_file.read_text(encoding="utf-8"))
    entry["data"] = {"dataset": "./pairs", "caption_column": f"caption_{code}", "english_column": "caption_en",
                     "streaming": streaming, **data_keys}
    entry_file.write_text(yaml.safe_dump(entry, allow_unicode=True), encoding="utf-8")
    return registry
