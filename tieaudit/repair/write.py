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
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.checkpoint.types import DTYPE_SIZES, TensorInfo
from tieaudit.errors import WriteError
from tieaudit.repair.jsonedit import dump_like, set_json_values
from tieaudit.repair.plan import FixPlan

if TYPE_CHECKING:
    from tieaudit.checkpoint import Checkpoint

STAGING_INFIX = ".tieaudit-tmp-"
COPY_CHUNK = 32 * 2**20
_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.tieaudit-tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def fault(point: str) -> None:
    """Testing aid: ``TIEAUDIT_FAULT=<point>`` kills the process with SIGKILL at that point of a write, so the
    tests can show that an interrupted fix leaves the checkpoint intact. Points: staged, weights, index,
    config, verified, committed. ``TIEAUDIT_FAULT=<point>:pause:<file>`` instead creates ``<file>.ready`` and waits
    (at most 120 s) until ``<file>`` is removed, so a test can act while a write is in progress."""
    wanted = os.environ.get("TIEAUDIT_FAULT", "")
    if wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted.startswith(f"{point}:pause:"):
        gate = Path(wanted.split(":", 2)[2])
        Path(f"{gate}.ready").touch()
        deadline = time.monotonic() + 120
        while gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


LOCK_SUFFIX = ".tieaudit-lock"


@contextlib.contextmanager
def write_lock(root: Path, display: str) -> Iterator[None]:
    """An advisory lock (``flock``) on rewriting the directory ``root`` in place, held until the switch is done.

    The lock file, ``.<name>.tieaudit-lock`` next to ``root`` (so it survives the directory swap), holds the
    holder's PID and is removed on release; a killed holder's lock is released by the kernel. A second writer
    does not wait: it fails at once with WriteError (exit 2) naming the holder, before it has written anything."""
    import fcntl

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


# Where a written tensor's bytes come from: the name of a stored tensor of the checkpoint (copied file to file),
# or a producer of its rows, in order, already in the dtype of its TensorInfo (a merged weight).
Chunks = Callable[[], Iterable[Any]]
DataFrom = str | Chunks
Entry = tuple[str, TensorInfo, DataFrom]


@dataclass
class WeightOutput:
    """The weight files of the fixed checkpoint: what is rewritten, what is new, and the final tensor map."""

    rewritten: dict[str, list[Entry]] = field(default_factory=dict)  # file -> entries
    new_files: dict[str, list[Entry]] = field(default_factory=dict)
    final: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # tensor -> (file, nbytes, elements)

    @property
    def files_written(self) -> list[str]:
        return [*self.new_files, *self.rewritten]


def layout_weights(ckpt: Checkpoint, plan: FixPlan) -> WeightOutput:
    """Decide which weight files a plan rewrites or adds. Entries are (name, info of the data, data_from)."""
    out = WeightOutput()
    dropped = {d.name for d in plan.drops}
    replaced = {s.name: s for s in plan.stores if s.replace}
    added = [s for s in plan.stores if not s.replace]
    touched = {ckpt.tensors[n].file for n in dropped | set(replaced) if n in ckpt.tensors}
    single = len(ckpt.weight_files) == 1 and ckpt.index_file is None
    if added:
        if single:
            touched.add(ckpt.weight_files[0])
        else:
            ext = ".bin" if ckpt.weight_files[0].endswith(".bin") else ".safetensors"
            stem = "pytorch_model" if ext == ".bin" else "model"
            out.new_files[_free_name(ckpt.root, f"{stem}-tieaudit", ext)] = [
                (s.name, s.info, s.data_from) for s in added
            ]
    for rel in sorted(touched):
        entries: list[Entry] = []
        for info in ckpt.file_tensors(rel):
            if info.name in dropped:
                continue
            if info.name in replaced:
                s = replaced[info.name]
                entries.append((info.name, s.info, s.data_from))
            else:
                entries.append((info.name, info, info.name))
        if single and added:
            entries.extend((s.name, s.info, s.data_from) for s in added)
        out.rewritten[rel] = entries
    for name, info in ckpt.tensors.items():
        if name not in dropped:
            out.final[name] = (info.file, info.nbytes, math.prod(info.shape))
    for rel, entries in [*out.rewritten.items(), *out.new_files.items()]:
        for name, info, _ in entries:
            out.final[name] = (rel, info.nbytes, math.prod(info.shape))
    return out


def _free_name(root: Path, stem: str, ext: str) -> str:
    candidate, n = f"{stem}{ext}", 1
    while os.path.lexists(root / candidate):
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return candidate


def new_config_text(ckpt: Checkpoint, plan: FixPlan) -> tuple[str, str] | None:
    """(old, new) text of config.json, or None when the plan leaves it alone."""
    if not plan.config or ckpt.config is None:
        return None
    old = _read_text(ckpt.root / ckpt.config.rel)
    return old, set_json_values(old, plan.config)


def new_index_text(ckpt: Checkpoint, plan: FixPlan, weights: WeightOutput) -> tuple[str, str] | None:
    """(old, new) text of the shard index, or None when it needs no change."""
    if ckpt.index_file is None:
        return None
    if not (weights.files_written or plan.rebuild_index or plan.drops):
        return None
    old = _read_text(ckpt.root / ckpt.index_file)
    data: dict[str, Any] = json.loads(old)
    old_map = data.get("weight_map", {})
    new_map = {name: file for name, (file, _, _) in weights.final.items()}
    if list(old_map) == sorted(old_map):
        new_map = dict(sorted(new_map.items()))
    data["weight_map"] = new_map
    meta = data.get("metadata")
    if isinstance(meta, dict) and "total_size" in meta:
        meta["total_size"] = sum(n for _, n, _ in weights.final.values())
    if isinstance(meta, dict) and "total_parameters" in meta:
        meta["total_parameters"] = sum(n for _, _, n in weights.final.values())
    new = dump_like(old, data)
    return (old, new) if new != old else None


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").removeprefix("\ufeff")


# -- staging -----------------------------------------------------------------------------------------


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
    from tieaudit.errors import UsageError

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


# -- weight files ------------------------------------------------------------------------------------


def write_weight_files(ckpt: Checkpoint, weights: WeightOutput, staging: Path) -> int:
    """Write the rewritten and new weight files into ``staging``; return the bytes written."""
    total = 0
    for rel, entries in [*weights.new_files.items(), *weights.rewritten.items()]:
        dest = staging / rel
        if rel.endswith(".bin"):
            total += _write_bin(ckpt, rel, entries, dest)
        else:
            meta = ckpt.file_metadata(rel) if rel in ckpt.weight_files else {"format": "pt"}
            total += write_safetensors(ckpt, entries, dest, meta)
    return total


def write_safetensors(ckpt: Checkpoint, entries: Iterable[Entry], dest: Path, metadata: dict[str, str]) -> int:
    """Stream a safetensors file: each entry's bytes come from stored tensor ``data_from`` of ``ckpt``, or from
    the chunks a producer yields (checked against the size the header announced).

    Tensors are laid out by element size (largest first), as safetensors does, so every tensor stays aligned.
    """
    ordered = sorted(entries, key=lambda e: (-DTYPE_SIZES[e[1].dtype], e[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, info, _ in ordered:
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    writer = _FileWriter(fd)
    try:
        writer.put(struct.pack("<Q", len(raw)) + raw)
        for name, info, data_from in ordered:
            if isinstance(data_from, str):
                rng = ckpt.byte_range(data_from)
                if rng is not None:  # copied file to file by the writer thread
                    ckpt.stats.tensor_bytes += rng[2]
                    writer.put((*rng, f"{ckpt.tensors[data_from].file}: ended while copying {data_from}"))
                    continue
                chunks: Iterable[Any] = (chunk for _, chunk in ckpt.iter_rows(data_from, COPY_CHUNK))
            else:
                chunks = data_from()
            produced = 0
            for chunk in chunks:  # computed here while the writer thread writes the previous chunks
                data = _tensor_bytes(chunk)
                produced += len(data)
                writer.put(data)
            if produced != info.nbytes:
                raise WriteError(f"internal error: {name} produced {produced} bytes, its header says {info.nbytes}")
        writer.close()
        os.fsync(fd)
    finally:
        writer.close(raise_error=False)
        os.close(fd)
    return 8 + len(raw) + offset


class _FileWriter:
    """Writes to one descriptor from a background thread, in order, so that computing the next chunk (on the
    calling thread) overlaps with writing the previous one. At most ``depth`` items wait (bounded memory).
    Items: bytes-like data, or ``(source fd, offset, length, message)`` to copy file to file."""

    def __init__(self, fd: int, depth: int = 3) -> None:
        import queue
        import threading

        self.fd = fd
        self.synced = 0
        self._sync_range = _sync_file_range()
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="tieaudit-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the caller raises it
            try:
                if isinstance(item, tuple):
                    src_fd, offset, length, message = item
                    _copy_range(src_fd, offset, length, message, self.fd)
                else:
                    _write_all(self.fd, item)
                self._start_writeback()
            except BaseException as exc:  # reported to the calling thread
                self.error = exc

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing back what is written so far (without waiting), so the fsync before the
        switch has little left to do and dirty pages do not pile up (Linux sync_file_range; a no-op elsewhere)."""
        if self._sync_range is None:
            return
        end = os.lseek(self.fd, 0, os.SEEK_CUR)
        if end - self.synced >= WRITEBACK_STEP:
            self._sync_range(self.fd, ctypes.c_int64(self.synced), ctypes.c_int64(end - self.synced), 2)
            self.synced = end

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self, raise_error: bool = True) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put(None)
            self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


WRITEBACK_STEP = 64 * 2**20


def _sync_file_range() -> Callable[..., int] | None:
    try:
        raw = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    raw.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn: Callable[..., int] = raw
    return fn


def _copy_range(src_fd: int, offset: int, length: int, message: str, out_fd: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to the end of ``out_fd`` (in-kernel when possible)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, out_fd, length - done, offset + done)  # one call per tensor: fastest
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:  # no copy_file_range here (or a short source): plain reads and writes
            data = os.pread(src_fd, min(length - done, COPY_CHUNK), offset + done)
            if not data:
                raise WriteError(message)
            _write_all(out_fd, data)
            n = len(data)
        done += n


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_bin(ckpt: Checkpoint, rel: str, entries: list[Entry], dest: Path) -> int:
    """Write a .bin file with torch.save; kept names keep their shared storages, copies get their own."""
    import torch

    state = ckpt.bin_state(rel) if rel in ckpt.weight_files else {}
    out: dict[str, Any] = {}
    for name, _, data_from in entries:
        assert isinstance(data_from, str), "computed tensors are written as safetensors"
        if data_from == name and name in state:
            out[name] = state[name]
        else:
            rows = ckpt.row_count(data_from)
            out[name] = ckpt.read_rows(data_from, 0, rows).clone()
    with open(dest, "xb") as fh:
        torch.save(out, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return os.path.getsize(dest)


def write_text(dest: Path, text: str) -> int:
    data = text.encode("utf-8")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
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


# -- the switch --------------------------------------------------------------------------------------

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
        fault("committed")
        shutil.rmtree(staging, ignore_errors=True)  # the old checkpoint, now under the staging name
        return
    for rel in order:
        os.replace(staging / rel, root / rel)
    fsync_dir(root)
    shutil.rmtree(staging, ignore_errors=True)
