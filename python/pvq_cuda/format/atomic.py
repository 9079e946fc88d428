"""Atomic, durable writes of files and whole directories: a reader (or a process killed at any
moment) sees the old version or the new one, never half of either.

Every file pvq_cuda writes goes through :func:`atomic_write`: the content is written to a fresh
temporary file beside the target (so the rename stays on one filesystem), flushed to disk, then
renamed over the target, and the directory entry is flushed too. Any failure, a KeyboardInterrupt
included, removes the temporary file and leaves an existing target untouched.

A checkpoint is a directory of several files, so it is replaced as a whole by
:func:`replace_directory`: the new version is written into a sibling temporary directory, flushed,
and swapped with the old one in a single ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+ on the usual
filesystems). Where that call is missing, two renames do it, and a crash between them leaves the
old version beside the target as ``.<name>.old-*``, which the next save or load puts back
(:func:`recover_directory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2). False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _backups(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)


def recover_directory(target: str | os.PathLike) -> None:
    """Put back the old version of a directory whose replacement (without RENAME_EXCHANGE) was
    killed between its two renames; a no-op otherwise."""
    target = Path(target).absolute()
    backups = _backups(target) if target.parent.is_dir() else []
    if backups and not target.exists():
        os.rename(backups[-1], target)
        backups = backups[:-1]
    for stale in backups:  # older versions that a finished replacement left behind
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync_path(os.path.join(root, name))
        fsync_dir(root)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Entries of the old directory that the new one does not write and ``keep`` accepts (a user's
    own files beside the checkpoint, a job's log) come along: hard links where possible."""
    for entry in old.iterdir():
        dst = new / entry.name
        if dst.exists() or os.path.islink(dst) or not keep(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True)
            continue
        try:
            os.link(entry, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(entry, dst, follow_symlinks=False)


@contextlib.contextmanager
def replace_directory(target: str | os.PathLike, keep: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Write a new version of directory ``target`` into the yielded temporary directory; when the
    block ends without an exception, swap it into place at once. Files of the old version that the
    new one lacks are carried over where ``keep(name)`` says so. On an exception, or a kill at any
    moment, ``target`` holds the old version (or nothing, if there was none) and the next call
    cleans up."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    for stale in target.parent.glob(f".{target.name}.new-*"):  # a killed earlier save's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            _carry_over(target, tmp, keep)
        _fsync_tree(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(str(tmp), str(target)):
            backup = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
            os.rename(target, backup)
            os.rename(tmp, target)  # a kill between the renames is what recover_directory undoes
            tmp = backup
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # now the old version
