"""polybridge.atomic: whole-or-nothing writes, with the modes a plain write would give."""

import os
import stat

import pytest

from polybridge.atomic import atomic_dir, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_file_has_the_mode_of_a_plain_open(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "w.bin", b"abc")
    with open(tmp_path / "plain.bin", "wb") as fh:
        fh.write(b"abc")
    assert (tmp_path / "w.bin").read_bytes() == b"abc"
    assert _mode(tmp_path / "w.bin") == _mode(tmp_path / "plain.bin") == 0o644


def test_written_folder_has_the_mode_of_a_plain_mkdir(tmp_path, umask_022):
    with atomic_dir(tmp_path / "out") as tmp:
        atomic_write_text(tmp / "a.txt", "x")
    (tmp_path / "plain").mkdir()
    assert _mode(tmp_path / "out") == _mode(tmp_path / "plain") == 0o755
    assert _mode(tmp_path / "out" / "a.txt") == 0o644


def test_failed_write_leaves_nothing_and_keeps_the_old_content(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_non_empty_target_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_files_written_through_temporary_files_get_plain_modes(tmp_path, umask_022):
    # safetensors' save_file writes through a temporary file and leaves 0600; published weights must not.
    import torch
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "weights") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
    assert _mode(tmp_path / "weights" / "model.safetensors") == 0o644
    assert _mode(tmp_path / "weights" / "sub") == 0o755
    assert _mode(tmp_path / "weights" / "run.sh") == 0o755
