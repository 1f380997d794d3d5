"""Strict, pure-Python reader of safetensors headers.

No torch import here: opening a checkpoint must stay cheap, and a header is only 8 + N bytes of JSON.
Every defect becomes an :class:`InputError` with a one-line message that names the file.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tieaudit.checkpoint.types import DTYPE_SIZES, TensorInfo
from tieaudit.errors import InputError

# A real header is a few MB at most (hundreds of thousands of tensors); beyond this it is corrupt or hostile.
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
_MAX_NAME_IN_MESSAGE = 120


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors, their data offsets and where the data region starts."""

    tensors: dict[str, TensorInfo]
    offsets: dict[str, tuple[int, int]]  # data_offsets, relative to data_start
    metadata: dict[str, str]
    data_start: int  # 8 + N: also the number of header bytes read
    file_size: int


class _DuplicateKeyError(Exception):
    """Raised from the JSON object hook: json.loads would otherwise keep the last value silently."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def open_regular_file(path: Path, label: str) -> int:
    """Open ``path`` read-only and return the descriptor, refusing anything but a regular file.

    A FIFO would block ``open()`` forever and a device could be endless, so the type is checked with
    ``os.stat`` before opening; ``O_NONBLOCK`` keeps a FIFO swapped in after the check from blocking too.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{label}: file does not exist (or is a broken symlink)") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{label}: not a regular file (FIFO, device or directory); refusing to read it")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{label}: cannot open: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{label}: not a regular file (FIFO, device or directory); refusing to read it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_exact(fd: int, offset: int, length: int, label: str) -> bytearray:
    """Read exactly ``length`` bytes at ``offset`` into a fresh buffer (pread never moves a shared file position)."""
    buf = bytearray(length)
    read_into(fd, offset, buf, label)
    return buf


def read_into(fd: int, offset: int, out: Any, label: str) -> None:
    """Fill the writable contiguous buffer ``out`` (a bytearray, a numpy array) with the bytes at ``offset``;
    a file that ends first is an InputError."""
    view = memoryview(out).cast("B")
    length = len(view)
    done = 0
    while done < length:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, length - done, offset + done)
            got = len(chunk)
            view[done : done + got] = chunk
        if got == 0:
            raise InputError(
                f"{label}: file ended after {offset + done} bytes, expected {offset + length} (truncated?)"
            )
        done += got


def parse_header(
    path: str | os.PathLike[str], rel: str | None = None
) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse the header of the safetensors file at ``path``.

    Returns ``(tensors, metadata, header_bytes_read)``; ``rel`` is the name used in TensorInfo.file and in
    error messages (default: the path as given). Raises InputError for any malformed header.
    """
    label = rel if rel is not None else os.fspath(path)
    fd = open_regular_file(Path(path), label)
    try:
        header = read_header_fd(fd, label)
    finally:
        os.close(fd)
    return header.tensors, header.metadata, header.data_start


def read_header_fd(fd: int, rel: str) -> SafetensorsHeader:
    """Read and validate the header of an open safetensors file; only 8 + N bytes are read."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise InputError(
            f"{rel}: file is {size} bytes, too short for a safetensors file (needs an 8-byte header length)"
        )
    n = int.from_bytes(read_exact(fd, 0, 8, rel), "little")
    _check_header_length(n, size, rel)
    raw = bytes(read_exact(fd, 8, n, rel))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{rel}: safetensors header is not valid UTF-8 (byte {8 + exc.start})") from None
    obj = _load_header_json(text, rel)
    data_len = size - 8 - n
    metadata = _parse_metadata(obj.pop(METADATA_KEY, None), rel)
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, entry in obj.items():
        tensors[name], offsets[name] = _parse_entry(name, entry, rel, 8 + n, data_len)
    _check_coverage(offsets, data_len, rel)
    return SafetensorsHeader(tensors, offsets, metadata, 8 + n, size)


def _check_header_length(n: int, size: int, rel: str) -> None:
    """Reject header lengths that cannot be right before reading (or allocating) anything."""
    if n == 0:
        raise InputError(f"{rel}: safetensors header length is 0")
    if n > MAX_HEADER_BYTES:
        raise InputError(
            f"{rel}: safetensors header length {n} is absurd (over {MAX_HEADER_BYTES} bytes); corrupt file?"
        )
    if n > size - 8:
        raise InputError(f"{rel}: safetensors header length {n} is larger than the rest of the file ({size - 8} bytes)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook that refuses duplicate keys (a loader would silently keep one of them)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _load_header_json(text: str, rel: str) -> dict[str, Any]:
    """Decode the header JSON: must be an object without duplicate keys."""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise InputError(f"{rel}: safetensors header has duplicate key {_short(exc.key)}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{rel}: safetensors header is not valid JSON (column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise InputError(f"{rel}: safetensors header nests too deeply to be a header") from None
    if not isinstance(obj, dict):
        raise InputError(f"{rel}: safetensors header is not a JSON object (got {_json_type(obj)})")
    return obj


def _parse_metadata(value: Any, rel: str) -> dict[str, str]:
    """``__metadata__`` is optional but, when present, must map strings to strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{rel}: safetensors __metadata__ is not an object (got {_json_type(value)})")
    for key, item in value.items():
        if not isinstance(item, str):
            raise InputError(f"{rel}: safetensors __metadata__[{_short(key)}] is not a string (got {_json_type(item)})")
    return dict(value)


def _parse_entry(name: str, entry: Any, rel: str, data_start: int, data_len: int) -> tuple[TensorInfo, tuple[int, int]]:
    """Validate one tensor entry: dtype, shape and data_offsets must agree with each other and the file."""
    where = f"{rel}: tensor {_short(name)}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: header entry is not an object (got {_json_type(entry)})")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise InputError(f"{where}: header entry has no {key!r}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(f"{where}: unsupported dtype {_short(dtype)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InputError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    offs = entry["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs) and 0 <= offs[0] <= offs[1]):
        raise InputError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_short(offs)}")
    begin, end = offs
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise InputError(
            f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {nbytes} bytes"
        )
    if end > data_len:
        raise InputError(
            f"{where}: data ends at byte {data_start + end}, past the end of the file ({data_start + data_len} bytes)"
        )
    info = TensorInfo(name=name, file=rel, dtype=dtype, shape=tuple(shape), nbytes=nbytes)
    return info, (begin, end)


def _check_coverage(offsets: dict[str, tuple[int, int]], data_len: int, rel: str) -> None:
    """The data regions must tile the data exactly, as the safetensors library requires (and so every loader that
    uses it): no two tensors share bytes (there is no aliasing in the format), no bytes between them belong to no
    tensor, and none follow the last one."""
    cursor, previous = 0, None
    for begin, end, name in sorted((begin, end, name) for name, (begin, end) in offsets.items()):
        if begin < cursor:
            raise InputError(f"{rel}: data regions of tensors {_short(previous)} and {_short(name)} overlap")
        if begin > cursor:
            raise InputError(
                f"{rel}: data bytes {cursor}-{begin} belong to no tensor (a hole before {_short(name)}); "
                "the safetensors library refuses the file"
            )
        cursor, previous = end, name
    if cursor != data_len:
        raise InputError(
            f"{rel}: {data_len - cursor} data bytes after the last tensor belong to no tensor; "
            "the safetensors library refuses the file"
        )


def _is_int(value: Any) -> bool:
    """JSON integers only: bool is an int subclass in Python and floats like 2.0 are not valid here."""
    return type(value) is int


def _json_type(value: Any) -> str:
    """JSON name of a decoded value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    """repr() capped in length, so a hostile name cannot flood a one-line message."""
    text = repr(value)
    return text if len(text) <= _MAX_NAME_IN_MESSAGE else text[: _MAX_NAME_IN_MESSAGE - 3] + "..."
