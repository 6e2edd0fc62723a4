"""Small shared helpers: the user-facing error type, atomic directory writes, cache locks, memory accounting."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class ElutqError(Exception):
    """An error caused by the user's input; the message names the problem and the fix."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process, as the OS accounts it (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Hand memory that malloc keeps after frees back to the OS (glibc's ``malloc_trim``; elsewhere a
    no-op).  The quantizer frees hundreds of MB of temporaries per layer, and without this a heap
    fragmented by them keeps its peak resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def dir_size_mb(path: Path) -> float:
    """A model directory's own files (weights, config, tokenizer), not the runtime's derived kernel cache."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) / 2**20


def move_into_place(src: Path, dest: Path, overwrite: bool = False) -> None:
    """Rename the finished directory ``src`` to ``dest``; an existing ``dest`` is replaced only with
    ``overwrite`` (an empty one always), and only after ``src`` is complete."""
    if dest.exists():
        here = Path.cwd().resolve()
        if dest.resolve() == here or dest.resolve() in here.parents:
            raise ElutqError(f"{dest} is the working directory or above it; elutq will not replace it")
        if not overwrite and any(dest.iterdir()):
            raise ElutqError(f"{dest} already exists and is not empty; choose another path or pass --overwrite")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        src.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dest)


@contextlib.contextmanager
def file_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the body.  Two processes
    making the same cache entry take turns, and the second finds the first's result instead of doing
    the work again beside it; ``waiting`` says what the holder is doing while this one waits.  A lock
    dies with its process, so a killed holder never blocks the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process {waiting} ({path})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; rename it into place only if the body succeeds.

    A killed or failed run leaves at most a hidden ``.<name>.tmp-*`` directory, never something at
    ``dest`` that looks complete.  With ``overwrite`` an existing ``dest`` is replaced only after the
    new one is fully written.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        move_into_place(tmp, dest, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
