"""Shared fixtures: a writable copy of the real registry, so tests can add and break languages."""

from __future__ import annotations

import re
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
    text = text.replace(old, f"source: ./model\n    architecture: {architecture}")
    # the real registry's plugins are made for the real backbone: they do not fit this one
    text = re.sub(r"\nplugins:\n(?:[ #].*\n|\n)*", "\n", text)
    registry.write_text(text, encoding="utf-8")
    return registry


def save_bench_branches(registry_file: Path) -> torch.nn.Module:
    """The benchmark tests' branches on the registry's tiny backbone: a perturbed zh bdm branch where zh's entry points
    and a perturbed ja pea branch in ``ja-pea`` beside the registry (passed as ``weights``); returns the UNet."""
    from tiny_components import perturb_

    from polybridge.backbones import load_backbone
    from polybridge.branches import get_branch_class
    from polybridge.encoders import load_encoder
    from polybridge.registry import load_registry

    root = registry_file.parent
    reg = load_registry(registry_file)
    unet = load_backbone(reg).unet
    for code, kind, where in (("zh", "bdm", root / "languages/zh/branch"), ("ja", "pea", root / "ja-pea")):
        entry = reg.language(code)
        encoder = load_encoder(entry)
        branch = get_branch_class(kind).from_unet(unet, encoder.hidden_size, encoder_name=entry.encoder.source)
        perturb_(branch, seed=1, std=0.02)
        branch.save_pretrained(where)
    return unet


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    """Path of a registry.yaml in tmp_path: a copy of the real one without built weights."""
    return copy_registry(tmp_path / "repo")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed (as diffusers' fast tests do)."""
    torch.manual_seed(0)


def point_at_parquet(registry: Path, code: str, rows: int, *, files: int = 2, **data_keys) -> Path:
    """Make ``code``'s entry train on a streamed folder of ``files`` parquet files of ``rows`` JPEG/caption rows of
    varied sizes (``caption_<code>``, ``caption_en``, every third row native-only), next to its language.yaml: the
    throughput benchmark's data (``benchmarks/perf/train_throughput.py``), smaller."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("perf_train_throughput",
                                                  REPO / "benchmarks" / "perf" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_streamed_data(registry, code, rows, files=files, sides=(8, 41), native_only_every=3,
                                      **data_keys)
