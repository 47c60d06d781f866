"""Atomic writes: a directory or a small file is there complete, or not at all.

    with atomic_dir(out_dir) as tmp: ...     one process writes into `tmp`, renamed to `out_dir`
    make_partial(partial); publish(partial, final)
                                             the two halves, for collective writers (checkpoints:
                                             every rank writes into `partial`, rank 0 publishes)
    write_text(path, text)                   a small file (a checkpoint tracker), replaced whole

Everything is written under a temporary sibling name (same file system), fsynced, renamed into
place with `os.replace`, and the parent directory is fsynced so that the rename survives a crash.
"""
from __future__ import annotations

import contextlib
import os
import shutil


def make_partial(partial: str) -> None:
    """An empty directory `partial` (and its parents), replacing a leftover of an earlier try."""
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)


def publish(partial: str, final: str, *, replace: bool = False, file_mode: int | None = None,
            dir_mode: int | None = None) -> None:
    """Make the finished directory `partial` appear as `final` in one rename.

    Args:
        replace: remove an existing `final` first (else `final` must be absent or empty).
        file_mode, dir_mode: permissions given to every file / directory of the tree, e.g. 0o644 /
            0o755 for a directory others read (files written through temporary files come out
            0600); None keeps what the writer created.
    """
    for top, dirs, files in os.walk(partial):
        for name in files:
            path = os.path.join(top, name)
            if file_mode is not None:
                os.chmod(path, file_mode)
            _fsync(path)
        if dir_mode is not None:
            os.chmod(top, dir_mode)
        _fsync_dir(top)
    if replace and os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def atomic_dir(final: str, *, file_mode: int | None = None, dir_mode: int | None = None):
    """A temporary directory beside `final`, published as `final` when the block succeeds and
    removed in any case; `file_mode`/`dir_mode` as in `publish`."""
    tmp = f"{os.path.abspath(final)}.partial-{os.getpid()}"
    make_partial(tmp)
    try:
        yield tmp
        publish(tmp, final, file_mode=file_mode, dir_mode=dir_mode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """Replace the file `path` by `text` atomically (written to `path`.tmp, fsynced, renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Persist a directory's entries; some file systems cannot fsync a directory (EINVAL), where
    the rename is as durable as they make it."""
    try:
        _fsync(path)
    except OSError:
        pass
