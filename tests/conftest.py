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
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "registry.yaml", dest / "registry.yaml")
    for folder in sorted((REPO / "languages").iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        target = dest / "languages" / folder.name
        target.mkdir(parents=True)
        for item in folder.iterdir():
            if item.is_file():
                shutil.copy(item, target / item.name)
            elif with_artifacts:
                shutil.copytree(item, target / item.name)
    return dest / "registry.yaml"


@pytest.fixture
def registry_copy(tmp_path: Path) -> Path:
    """Path of a registry.yaml in tmp_path: a copy of the real one without built weights."""
    return copy_registry(tmp_path / "repo")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed (as diffusers' fast tests do)."""
    torch.manual_seed(0)
