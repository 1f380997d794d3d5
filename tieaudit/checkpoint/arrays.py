"""Stored tensor bytes as numpy float32 rows, without torch.

The adapter check only needs float arithmetic on a few tensors; numpy imports in 0.1 s where torch takes
about 2 s, so rows of the common floating dtypes are decoded here directly from the safetensors bytes.
Every decoding is exact (bf16 and f16 widen to float32 without rounding); float64 rounds to float32.
Other dtypes (float8, integers) and pickled tensors go through torch (:meth:`Checkpoint.read_float32`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from tieaudit.checkpoint.safetensors_header import read_into

if TYPE_CHECKING:
    import numpy as np

Tee = Callable[["np.ndarray"], None]  # sees the stored bytes of a read (uint8)
NUMPY_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})


class Scratch:
    """Buffers refilled by successive reads of one loop (a fresh 32 MiB array per chunk costs a page fault per
    4 KiB): what a read returns through it is valid until the next read through it."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def take(self, role: str, count: int, dtype: str) -> np.ndarray:
        """``count`` elements of ``dtype`` for ``role`` (the same memory each time when it is large enough)."""
        import numpy as np

        buf = self._bufs.get(role)
        if buf is None or buf.dtype != np.dtype(dtype) or buf.size < count:
            buf = self._bufs[role] = np.empty(count, dtype)
        return buf[:count]


def read_float32(
    fd: int,
    offset: int,
    dtype: str,
    shape: tuple[int, ...],
    label: str,
    tee: Tee | None = None,
    scratch: Scratch | None = None,
) -> np.ndarray:
    """The ``dtype`` elements of ``shape`` stored at ``offset``, as a float32 array: a fresh one, or one in
    ``scratch``'s memory (valid until its next read).

    ``dtype`` must be in :data:`NUMPY_FLOAT_DTYPES`. bf16 is the upper half of a float32, so it is widened by
    a 16-bit shift into the output buffer: one pass, no temporary float array. ``tee`` sees the stored bytes
    (uint8) before they are decoded, so another check can use the same read.
    """
    import numpy as np

    count = math.prod(shape)

    def buffer(role: str, kind: str) -> np.ndarray:
        return np.empty(count, kind) if scratch is None else scratch.take(role, count, kind)

    if dtype == "F32":
        out = buffer("out", "<f4")
        read_into(fd, offset, out, label)
        if tee is not None:
            tee(out.view(np.uint8))
        return (out if out.dtype == np.float32 else out.astype(np.float32)).reshape(shape)
    raw = buffer("raw", {"F16": "<f2", "BF16": "<u2", "F64": "<f8"}[dtype])
    read_into(fd, offset, raw, label)
    if tee is not None:
        tee(raw.view(np.uint8))
    out = buffer("out", "<f4")
    if dtype == "BF16":
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = raw
    return out.reshape(shape)
