"""Writing a fixed checkpoint: a complete staged copy, then one atomic switch.

The fixed checkpoint is built in a staging directory next to its destination (same filesystem): unchanged
files are hard-linked (in place) or copied (``--output-dir``), changed weight files are written fresh, then
the index, then ``config.json`` last, everything fsynced. The switch is a single rename:

- ``--output-dir DIR``: ``rename(staging, DIR)`` (DIR absent or an empty directory);
- ``--in-place``: ``renameat2(staging, PATH, RENAME_EXCHANGE)`` swaps the two directories atomically, and the
  old one (now under the staging name) is removed.

A crash or SIGKILL at any moment leaves PATH as it was (plus a staging directory named
``.NAME.tieaudit-tmp-PID-XXXX``, removed by the next run) or fully fixed. Where the kernel or filesystem has
no RENAME_EXCHANGE, files are replaced one by one (new weight files, rewritten ones, the index, then the
config), each with ``os.replace``; docs/commands.md (How `fix` writes) says what that guarantees.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tieaudit.errors import UsageError, WriteError

if TYPE_CHECKING:
    pass


STAGING_INFIX = ".tieaudit-tmp-"


_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.tieaudit-tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def clean_stale_staging(final: Path) -> list[Path]:
    """Remove staging directories of ``final`` left by runs that died (their PID is gone)."""
    removed = []
    parent = final.parent
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            m = _STAGING_RE.match(entry.name)
            if not m or m.group("name") != final.name or not entry.is_dir(follow_symlinks=False):
                continue
            if _alive(int(m.group("pid"))):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_dir(output_dir: str | os.PathLike[str], inputs: Iterable[Path], what: str) -> Path:
    """The absolute destination of ``--output-dir``: absent or an empty directory, outside every input directory
    (``what`` names them in the error), its parent created and writable. Raises UsageError / WriteError."""

    dest = Path(output_dir).absolute()
    for root in inputs:
        real = root.resolve()
        if dest.resolve() == real or dest.resolve().is_relative_to(real):
            raise UsageError(f"--output-dir must be outside {what}")
    if os.path.lexists(dest):
        if not dest.is_dir() or dest.is_symlink():
            raise UsageError(f"--output-dir {output_dir} exists and is not a directory")
        if any(os.scandir(dest)):
            raise UsageError(f"--output-dir {output_dir} is not empty; refusing to write into it")
    # nothing is created yet (make_staging creates missing parents when the write starts): a refused run leaves
    # no trace; here only the nearest existing ancestor must be a writable directory
    ancestor = dest.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--output-dir {output_dir}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise WriteError(f"cannot write to {ancestor}: permission denied")
    return dest


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging(final: Path) -> Path:
    path = final.parent / f".{final.name}{STAGING_INFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except OSError as exc:
        raise WriteError(f"cannot create a staging directory next to {final}: {exc.strerror or exc}") from None
    return path


def populate(root: Path, staging: Path, skip: set[str], link: bool) -> int:
    """Copy (or hard-link) every entry of ``root`` except ``skip`` into ``staging``; return bytes copied."""
    copied = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        dest_dir = staging if rel_dir == "." else staging / rel_dir
        for d in list(dirnames):
            src = Path(dirpath, d)
            rel = os.path.normpath(os.path.join(rel_dir, d))
            if os.path.islink(src):
                dirnames.remove(d)
                _copy_symlink(root, src, dest_dir / d, rel, link)
                continue
            os.mkdir(dest_dir / d)
            shutil.copymode(src, dest_dir / d)
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in skip:
                continue
            src = Path(dirpath, name)
            mode = os.lstat(src).st_mode
            if stat.S_ISLNK(mode):
                copied += _copy_symlink(root, src, dest_dir / name, rel, link)
            elif stat.S_ISREG(mode):
                copied += _copy_file(src, dest_dir / name, link)
            else:
                raise WriteError(f"{rel} is not a regular file (FIFO, socket or device); refusing to copy it")
    return copied


def _copy_file(src: Path, dest: Path, link: bool) -> int:
    if link:
        try:
            os.link(src, dest)
            return 0
        except OSError:
            pass  # another filesystem, or hard links not permitted: copy
    shutil.copy2(src, dest)
    return os.path.getsize(dest)


def _copy_symlink(root: Path, src: Path, dest: Path, rel: str, link: bool) -> int:
    target = os.readlink(src)
    real = Path(os.path.realpath(src))
    inside = real.is_relative_to(root) or (
        root.parent.name == "snapshots" and real.is_relative_to(root.parent.parent / "blobs")
    )
    if link or not inside or not real.exists():
        os.symlink(target, dest)  # kept as a link: in place it still resolves; outside links are not followed
        return 0
    if real.is_dir():
        shutil.copytree(real, dest, symlinks=True)
        return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    shutil.copy2(real, dest)
    return os.path.getsize(dest)


def write_text(dest: Path, text: str) -> int:
    data = text.encode("utf-8")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def carry_metadata(root: Path, staging: Path, rewritten: Iterable[str]) -> None:
    """Give every rewritten file the mode, owner and extended attributes of the file it replaces (a checkpoint kept
    0600, or labelled with xattrs, stays so). Owner and xattrs are best effort: only what this user may set."""
    for rel in rewritten:
        src, dest = root / rel, staging / rel
        try:
            st = os.stat(src)
        except FileNotFoundError:
            continue  # a new file: created with the default mode
        if not dest.exists():
            continue
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(OSError):
                os.chown(dest, st.st_uid, st.st_gid)
        for name in _xattrs(src):
            with contextlib.suppress(OSError):
                os.setxattr(dest, name, os.getxattr(src, name))


def _xattrs(path: Path) -> list[str]:
    try:
        return os.listxattr(path)
    except (OSError, AttributeError):  # no xattr support on this filesystem or platform
        return []


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


_RENAME_EXCHANGE = 2


_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[..., int] = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


def commit_output_dir(staging: Path, dest: Path) -> None:
    """Move the staged copy to ``dest`` (absent or an empty directory) with one rename. Once renamed, the output
    exists: making the rename itself durable is best effort and never turns a committed write into an error."""
    os.rename(staging, dest)
    with contextlib.suppress(OSError):
        fsync_dir(dest.parent)


def commit_in_place(staging: Path, root: Path, order: list[str]) -> None:
    """Swap the staged copy with ``root``; without RENAME_EXCHANGE, replace the changed files one by one."""
    os.chmod(staging, stat.S_IMODE(os.stat(root).st_mode))
    if exchange(staging, root):
        fsync_dir(root.parent)
        step("committed")
        shutil.rmtree(staging, ignore_errors=True)  # the old checkpoint, now under the staging name
        return
    for rel in order:
        os.replace(staging / rel, root / rel)
    fsync_dir(root)
    shutil.rmtree(staging, ignore_errors=True)


StepObserver = Callable[[str], None]
_observers: list[StepObserver] = []


def step(point: str) -> None:
    """A write has reached ``point``: staged, weights, index, config, peft-checked (merge), verified, committed.
    Nothing happens unless an observer is registered with :func:`observe_steps`."""
    for observer in _observers:
        observer(point)


@contextlib.contextmanager
def observe_steps(observer: StepObserver) -> Iterator[None]:
    """Call ``observer`` with each point a write reaches while the context is open (the tests kill or pause a
    write there to show that an interrupted fix or merge leaves the checkpoint intact)."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Staged:
    """A staging directory next to ``final`` (`make_staging`); `commit` marks it switched into place."""

    def __init__(self, final: Path) -> None:
        self.path = make_staging(final)
        self.committed = False


@contextlib.contextmanager
def staged(final: Path, failed: Callable[[OSError], str]) -> Iterator[Staged]:
    """Write ``final`` through a staging directory: an OSError becomes a WriteError with the line ``failed(exc)``,
    and the staging directory is removed unless the block set ``committed`` (the one way fix and merge end)."""
    stage = Staged(final)
    try:
        yield stage
    except OSError as exc:
        raise WriteError(failed(exc)) from None
    finally:
        if not stage.committed:
            shutil.rmtree(stage.path, ignore_errors=True)
