"""Atomic writes: a file or folder appears whole, or not at all.

Every artifact polybridge writes (weights, tokenizers, rendered sets, registry edits) goes through
here, so an interrupted or failing write never leaves half a folder where a good one was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from polybridge.errors import PolyBridgeFileExistsError, PolyBridgeNotADirectoryError, PolyBridgePermissionError


def check_writable_parent(target: str | Path) -> Path:
    """``target`` as a Path, after checking that its parent can be created and written.

    The error names the path, so a bad ``--out`` fails before any work is done.
    """
    target = Path(target).expanduser()
    parent = target.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PolyBridgeNotADirectoryError(f"cannot write {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PolyBridgePermissionError(f"cannot write {target}: {existing} is not writable")
    return target


def check_dir_target(target: str | Path, overwrite: bool = False) -> Path:
    """``target`` as a Path, after checking that :func:`atomic_dir` could write it: a writable parent, and an
    existing ``target`` is a folder, empty unless ``overwrite``. Call it first to fail before long work."""
    target = check_writable_parent(target)
    if target.exists():
        if not target.is_dir():
            raise PolyBridgeFileExistsError(f"{target} exists and is not a folder")
        if any(target.iterdir()) and not overwrite:
            raise PolyBridgeFileExistsError(f"{target} exists and is not empty (use overwrite / --overwrite to replace it)")
    return target


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it replaces ``target``, on error it is removed.

    An existing non-empty ``target`` is refused unless ``overwrite``; then it is replaced only
    once the new content is complete.
    """
    target = check_dir_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    _chmod_like_mkdir(tmp)
    try:
        yield tmp
        _chmod_tree_like_plain_writes(tmp)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: str | Path, target: str | Path) -> None:
    """Rename the complete folder ``tmp`` to ``target`` (a sibling), replacing what is there; the previous
    content is removed only once the new one is in place, and put back if the rename fails.

    :func:`atomic_dir` ends with this; call it directly when several processes fill one folder together
    (each writing its part of a distributed checkpoint into ``tmp``) and one of them publishes it."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old / "x", target)  # put the previous content back before giving up
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 folders; give the result the mode a plain mkdir would (0777 less the umask)."""
    os.chmod(path, 0o777 & ~_umask())


def _chmod_tree_like_plain_writes(root: Path) -> None:
    """Writers that go through a temporary file (mkstemp, safetensors' ``save_file``) leave 0600 files; give
    everything under ``root`` the mode a plain open()/mkdir would (executables keep their x bits)."""
    umask = _umask()
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir() or path.stat().st_mode & 0o100:
            path.chmod(0o777 & ~umask)
        else:
            path.chmod(0o666 & ~umask)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = check_writable_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the mode a plain open() would
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
