"""Strict, pure-Python reader of GGUF headers (llama.cpp's format), that never reads tensor data.

The layout (ggml/include/gguf.h): magic ``GGUF``, a uint32 version (2 or 3), int64 tensor and key-value counts, the
key-value pairs, then per tensor its name, dimensions (ggml order: ``ne[0]`` varies fastest, so an embedding is
``[n_embd, n_vocab]``), ggml type and data offset; the data section starts at the next multiple of
``general.alignment`` (default 32). Everything little-endian.

`gguf.GGUFReader` memory-maps the whole file and parses every array element in Python (seconds for a tokenizer of
150k entries), and cannot open a file whose last tensor is truncated. This reader walks the header with buffered
``pread``s, keeps scalar values and skips arrays (keeping their element type and count, and the values of short
numeric ones), and checks each tensor's extent against the file size the way llama.cpp's loader does (data inside
the file, offsets aligned, no overlap, no duplicate names or keys). Every defect is an `InputError` naming the file.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tieaudit.checkpoint.safetensors_header import open_regular_file, read_into
from tieaudit.errors import InputError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_COUNT = 1 << 24  # tensors or key-value pairs: llama.cpp files hold a few thousand
MAX_ARRAY = 1 << 30  # elements of one array (llama.cpp's GGUF_MAX_ARRAY_ELEMENTS)
MAX_STRING = 1 << 30  # bytes of one string (GGUF_MAX_STRING_LENGTH)
MAX_HEADER_BYTES = 1 << 31  # a header is megabytes (tokenizers); beyond this it is corrupt or hostile
SHORT_ARRAY = 64  # numeric arrays up to this many elements keep their values
_CHUNK = 1 << 16  # read ahead this much: a header is read in few calls, and little tensor data with it

# value types: (struct format or None, size)
_SCALARS = {
    0: ("<B", 1),  # uint8
    1: ("<b", 1),  # int8
    2: ("<H", 2),  # uint16
    3: ("<h", 2),  # int16
    4: ("<I", 4),  # uint32
    5: ("<i", 4),  # int32
    6: ("<f", 4),  # float32
    7: ("<?", 1),  # bool
    10: ("<Q", 8),  # uint64
    11: ("<q", 8),  # int64
    12: ("<d", 8),  # float64
}
STRING, ARRAY = 8, 9
TYPE_NAMES = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}

# ggml types: name, (block size, bytes per block) as in gguf-py's GGML_QUANT_SIZES (tests hold this copy to it)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] varies fastest (an embedding: (n_embd, n_vocab))
    type_id: int
    type_name: str
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def rows(self) -> int:
        """Rows as numpy sees the tensor (the product of every dimension but the first)."""
        return math.prod(self.dims[1:]) if len(self.dims) > 1 else 1

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / PyTorch order (the reverse of ``dims``): an embedding is (n_vocab, n_embd)."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GgufArray:
    """An array value: its element type, its length, and its values when it is short and numeric."""

    element_type: str
    count: int
    values: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]  # scalars and strings as values; arrays as GgufArray
    tensors: dict[str, GgufTensor]
    alignment: int
    data_start: int
    file_size: int
    header_bytes: int  # bytes read
    unknown_types: tuple[str, ...] = field(default=())  # tensors of a ggml type this reader does not know

    def string(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


class _Cursor:
    """Sequential reads over a file descriptor, in 64 KiB buffered chunks; every byte it hands out is counted."""

    def __init__(self, fd: int, size: int, label: str) -> None:
        self.fd, self.size, self.label = fd, size, label
        self.pos = 0
        self._buf = b""
        self._buf_at = 0
        self.read = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise InputError(
                f"{self.label}: truncated: {what} at byte {self.pos} runs past the end ({self.size} bytes)"
            )
        if self.pos + n > MAX_HEADER_BYTES:
            raise InputError(f"{self.label}: the GGUF header is over {MAX_HEADER_BYTES >> 30} GiB; refusing to read on")
        start = self.pos - self._buf_at
        if start + n > len(self._buf):
            want = max(n, _CHUNK)
            want = min(want, self.size - self.pos)
            buf = bytearray(want)
            read_into(self.fd, self.pos, buf, self.label)
            self.read += want
            self._buf, self._buf_at, start = bytes(buf), self.pos, 0
        out = self._buf[start : start + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", 8, f"the length of {what}")
        if n > MAX_STRING:
            raise InputError(f"{self.label}: {what} claims {n} bytes (corrupt)")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.label}: {what} is not UTF-8 (byte {self.pos - n})") from None

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InputError(
                f"{self.label}: truncated: {what} at byte {self.pos} runs past the end ({self.size} bytes)"
            )
        if self.pos + n <= self._buf_at + len(self._buf):
            self.pos += n
        else:
            self.pos += n
            self._buf, self._buf_at = b"", self.pos


def read_gguf_header(path: str | os.PathLike[str], label: str | None = None) -> GgufHeader:
    """Parse and validate the header of the GGUF file at ``path`` (tensor data is never read)."""
    label = label or str(path)
    fd = open_regular_file(Path(path), label)
    try:
        size = os.fstat(fd).st_size
        cur = _Cursor(fd, size, label)
        if size < 4 or cur.take(4, "the magic") != MAGIC:
            raise InputError(f"{label}: not a GGUF file (no GGUF magic)")
        version = cur.unpack("<I", 4, "the version")
        if version & 0xFFFF == 0 and version:
            raise InputError(f"{label}: GGUF version {version:#x}: a big-endian file (not supported)")
        if version not in VERSIONS:
            raise InputError(f"{label}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = cur.unpack("<Q", 8, "the tensor count")
        n_kv = cur.unpack("<Q", 8, "the key-value count")
        if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
            raise InputError(f"{label}: the header claims {n_tensors} tensors and {n_kv} key-value pairs (corrupt)")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"key {i}")
            if key in metadata:
                raise InputError(f"{label}: duplicate metadata key {key[:120]!r}")
            vtype = cur.unpack("<I", 4, f"the type of {key[:120]!r}")
            metadata[key] = _value(cur, vtype, key)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise InputError(f"{label}: general.alignment {alignment!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}")
            n_dims = cur.unpack("<I", 4, f"the dimension count of {name[:120]!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise InputError(f"{label}: tensor {name[:120]!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = tuple(cur.unpack("<q", 8, f"a dimension of {name[:120]!r}") for _ in range(n_dims))
            type_id = cur.unpack("<I", 4, f"the type of {name[:120]!r}")
            offset = cur.unpack("<Q", 8, f"the data offset of {name[:120]!r}")
            infos.append((name, dims, type_id, offset))
        data_start = -(-cur.pos // alignment) * alignment
        tensors, unknown = _tensors(infos, alignment, data_start, size, label)
        return GgufHeader(version, metadata, tensors, alignment, data_start, size, cur.read, tuple(unknown))
    finally:
        os.close(fd)


def _value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return cur.unpack(fmt, size, f"the value of {key[:120]!r}")
    if vtype == STRING:
        return cur.string(f"the value of {key[:120]!r}")
    if vtype != ARRAY:
        raise InputError(f"{cur.label}: metadata {key[:120]!r} has unknown value type {vtype}")
    etype = cur.unpack("<I", 4, f"the element type of {key[:120]!r}")
    count = cur.unpack("<Q", 8, f"the length of {key[:120]!r}")
    if count > MAX_ARRAY:
        raise InputError(f"{cur.label}: metadata {key[:120]!r} claims {count} elements (corrupt)")
    if etype in _SCALARS:
        fmt, size = _SCALARS[etype]
        if count <= SHORT_ARRAY:
            raw = cur.take(size * count, f"the values of {key[:120]!r}")
            values = struct.unpack(f"<{count}{fmt[1]}", raw)
            return GgufArray(TYPE_NAMES[etype], count, values)
        cur.skip(size * count, f"the values of {key[:120]!r}")
        return GgufArray(TYPE_NAMES[etype], count)
    if etype == STRING:
        for _ in range(count):
            n = cur.unpack("<Q", 8, f"an element of {key[:120]!r}")
            if n > MAX_STRING:
                raise InputError(f"{cur.label}: an element of {key[:120]!r} claims {n} bytes (corrupt)")
            cur.skip(n, f"an element of {key[:120]!r}")
        return GgufArray("string", count)
    raise InputError(f"{cur.label}: metadata {key[:120]!r} is an array of unsupported type {etype}")


def _tensors(
    infos: list[tuple[str, tuple[int, ...], int, int]], alignment: int, data_start: int, size: int, label: str
) -> tuple[dict[str, GgufTensor], list[str]]:
    out: dict[str, GgufTensor] = {}
    unknown = []
    spans = []
    for name, dims, type_id, rel in infos:
        where = f"{label}: tensor {name[:120]!r}"
        if name in out:
            raise InputError(f"{label}: duplicate tensor name {name[:120]!r}")
        if any(d < 0 for d in dims):
            raise InputError(f"{where} has a negative dimension {list(dims)}")
        if rel % alignment:
            raise InputError(f"{where} has offset {rel}, not a multiple of the alignment {alignment}")
        known = GGML_TYPES.get(type_id)
        elements = math.prod(dims)
        if known is None:
            unknown.append(name)
            nbytes = 0  # its extent cannot be checked
            type_name = f"type {type_id}"
        else:
            type_name, block, block_bytes = known
            if dims[0] % block:
                raise InputError(f"{where}: its first dimension {dims[0]} is not a multiple of {type_name}'s {block}")
            nbytes = elements // block * block_bytes
        start = data_start + rel
        if start + nbytes > size:
            raise InputError(
                f"{where}: its data [{start}, {start + nbytes}) runs past the end of the file ({size} bytes): truncated"
            )
        out[name] = GgufTensor(name, dims, type_id, type_name, start, nbytes)
        if nbytes:
            spans.append((start, start + nbytes, name))
    spans.sort()
    for (_, a1, a), (b0, _, b) in itertools.pairwise(spans):
        if b0 < a1:
            raise InputError(f"{label}: the data of tensors {a[:80]!r} and {b[:80]!r} overlap")
    return out, unknown
