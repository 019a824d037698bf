"""Atomic writes: a file or folder appears whole, or not at all.

Every artifact polybridge writes (weights, tokenizers, rendered sets, registry edits) goes through
here, so an interrupted or failing write never leaves half a folder where a good one was.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from polybridge.errors import PolyBridgeFileExistsError, PolyBridgeNotADirectoryError, PolyBridgePermissionError

#: The empty file :func:`atomic_dir` puts in every folder it writes: a folder that holds it is one polybridge wrote
#: and may replace; a folder without it that a registry entry (not the user's own ``--out``) points at is not.
MARKER = ".polybridge-output"
#: A temporary sibling (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) whose process is gone is stale; one without a
#: process id (written by an older polybridge) is stale once it is this old (seconds).
STALE_SECONDS = 3600


def no_follow(path: str | Path) -> Path:
    """``path`` made absolute with every folder above it resolved but the last part kept as written: a symlink
    named as an output is replaced as a link, never followed to the folder it points at."""
    path = Path(path).expanduser().absolute()
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def mark_ours(folder: str | Path) -> None:
    """Put :data:`MARKER` in ``folder``: polybridge wrote it and may replace it (a branch, a tokenizer)."""
    (Path(folder) / MARKER).touch()


def is_ours(folder: str | Path) -> bool:
    """Whether ``folder`` is a folder polybridge wrote (it holds :data:`MARKER`) or an empty one."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    return (folder / MARKER).is_file() or not any(folder.iterdir())


def check_replaceable(target: str | Path, home: str | Path, named_by: str) -> None:
    """Refuse to replace ``target``, a folder that ``named_by`` (a registry file and key) points at, when it lies
    outside ``home`` (the language's folder), holds files and was not written by polybridge. A symlink there is
    replaced as a link (see :func:`no_follow`), so only a real folder is checked."""
    target = no_follow(target)
    if target.is_symlink() or not target.exists():
        return
    home = Path(home).resolve()
    if target == home or home in target.parents or is_ours(target):
        return
    raise PolyBridgeFileExistsError(
        f"{named_by}: {target} is outside {home} and holds files polybridge did not write (no {MARKER}); "
        "polybridge will not replace it: point the entry at a new folder inside the language folder, or empty "
        "or remove that folder yourself")


def check_file_target(target: str | Path, overwrite: bool, flag: str) -> Path:
    """``target`` (a file to write) as a Path, after checking its parent is writable and that an existing file is
    replaced only with ``overwrite``; the error names ``flag``."""
    target = check_writable_parent(target)
    if target.is_dir():
        raise PolyBridgeFileExistsError(f"{flag} {target}: is a folder; give a file name")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise PolyBridgeFileExistsError(f"{flag} {target}: exists; pass --overwrite to replace it, or another name")
    return target


def remove_stale(target: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` that an interrupted (killed) write left behind, saying so on
    stderr; a killed :func:`publish_dir` that had moved the previous content aside but not yet put the new one
    in place gets the previous content back. Siblings of a process that is still running are left alone."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    pattern = glob.escape(f".{target.name}.")
    for path in sorted(parent.glob(pattern + "tmp-*")) + sorted(parent.glob(pattern + "old-*")):
        if not _is_stale(path):
            continue
        kind = "old" if path.name.startswith(f".{target.name}.old-") else "tmp"
        if kind == "old" and (path / "x").exists() and not (target.exists() or target.is_symlink()):
            os.replace(path / "x", target)
            print(f"polybridge: {target} was moved aside by an interrupted write; put it back", file=sys.stderr)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        print(f"polybridge: removed {path}, left by an interrupted write", file=sys.stderr)
    return removed


def _is_stale(path: Path) -> bool:
    pid_text = path.name.rsplit(".", 1)[-1].split("-")[1] if "-" in path.name.rsplit(".", 1)[-1] else ""
    if pid_text.startswith("p") and pid_text[1:].isdigit():
        pid = int(pid_text[1:])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # alive, another user's
        return False
    try:
        return time.time() - path.lstat().st_mtime > STALE_SECONDS
    except OSError:
        return False


def _tmp_prefix(target: Path, kind: str) -> str:
    """``.NAME.KIND-pPID-``: the process id lets the next run tell a killed write's leftovers from a live one."""
    return f".{target.name}.{kind}-p{os.getpid()}-"


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
def atomic_dir(target: str | Path, overwrite: bool = False, mark: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it replaces ``target``, on error it is removed.

    An existing non-empty ``target`` is refused unless ``overwrite``; then it is replaced only
    once the new content is complete. ``mark``: put :data:`MARKER` in it (a folder a registry entry names).
    """
    target = check_dir_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target, "tmp"), dir=target.parent))
    _chmod_like_mkdir(tmp)
    try:
        yield tmp
        if mark:
            mark_ours(tmp)
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
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target, "old"), dir=target.parent))
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
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path, "tmp"), dir=path.parent)
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
