"""Atomic, durable file writes: a reader sees the old file or the new one, never half of either.

Every file pvq_cuda writes goes through :func:`atomic_write`: the content is written to a fresh
temporary file beside the target (so the rename stays on one filesystem), flushed to disk, then
renamed over the target, and the directory entry is flushed too. Any failure, a KeyboardInterrupt
included, removes the temporary file and leaves an existing target untouched.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def _create_temp(directory: str, base: str) -> tuple[str, int]:
    """Create (exclusively) an empty file with a fresh name next to the target.

    Returns its path and its permission bits, which are 0o666 less the process umask: the mode a
    plainly created file would get, read back without touching the (process-wide) umask.
    """
    for _ in range(100):
        tmp = os.path.join(directory, f".{base[:180]}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(errno.EEXIST, "could not find an unused temporary file name", directory)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames inside ``directory`` durable where the platform allows (not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, make_parents: bool = False) -> None:
    """Run ``write(tmp)`` to fill a temporary file beside ``path``, then rename it over ``path``.

    ``write`` may replace the temporary file by path (safetensors writes to its own temporary file
    and renames it onto the one given), so everything after it goes by path. The result gets the
    permissions a plainly created file would. With ``make_parents`` missing directories are created;
    otherwise a missing directory raises FileNotFoundError before anything is written.
    """
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    if make_parents:
        os.makedirs(directory, exist_ok=True)
    tmp, mode = _create_temp(directory, os.path.basename(target))
    try:
        write(tmp)
        os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (parent directories created)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), make_parents=True)


def write_json(path: str | os.PathLike, obj, default: Callable = str) -> None:
    """Write ``obj`` as indented JSON atomically (parent directories created); ``default`` turns
    objects JSON does not know into something it does (``str`` by default)."""
    write_text(path, json.dumps(obj, indent=1, default=default) + "\n")
