"""The advisory lock that keeps two in-place rewrites of one directory from interleaving."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tieaudit.errors import WriteError

if TYPE_CHECKING:
    pass


LOCK_SUFFIX = ".tieaudit-lock"


@contextlib.contextmanager
def write_lock(root: Path, display: str) -> Iterator[None]:
    """An advisory lock (``flock``) on rewriting the directory ``root`` in place, held until the switch is done.

    The lock file, ``.<name>.tieaudit-lock`` next to ``root`` (so it survives the directory swap), holds the
    holder's PID and is removed on release; a killed holder's lock is released by the kernel. A second writer
    does not wait: it fails at once with WriteError (exit 2) naming the holder, before it has written anything."""
    import fcntl  # lazy: POSIX only

    path = root.parent / f".{root.name}{LOCK_SUFFIX}"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise WriteError(f"cannot lock {display} for writing ({path}): {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise WriteError(
                f"{display} is being rewritten by another tieaudit process (pid {holder}); "
                "nothing was changed: run again when it has finished"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take a fresh one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
