"""Writing tensor files: safetensors (streamed, with writeback throttling) and the legacy pickled ``.bin``.

A written tensor's bytes come from a stored tensor of the checkpoint (copied file to file) or from a producer
of its rows (a merged weight)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.checkpoint.types import DTYPE_SIZES, TensorInfo
from tieaudit.errors import WriteError
from tieaudit.repair.staging import write_all

COPY_CHUNK = 32 * 2**20

if TYPE_CHECKING:
    from tieaudit.checkpoint import Checkpoint


# Where a written tensor's bytes come from: the name of a stored tensor of the checkpoint (copied file to file),
# or a producer of its rows, in order, already in the dtype of its TensorInfo (a merged weight).
Chunks = Callable[[], Iterable[Any]]


DataFrom = str | Chunks


Entry = tuple[str, TensorInfo, DataFrom]


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
                    write_all(self.fd, item)
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
            write_all(out_fd, data)
            n = len(data)
        done += n


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def write_bin(ckpt: Checkpoint, rel: str, entries: list[Entry], dest: Path) -> int:
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
