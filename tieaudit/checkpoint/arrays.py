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


def read_float32(
    fd: int, offset: int, dtype: str, shape: tuple[int, ...], label: str, tee: Tee | None = None
) -> np.ndarray:
    """The ``dtype`` elements of ``shape`` stored at ``offset``, as a fresh float32 array.

    ``dtype`` must be in :data:`NUMPY_FLOAT_DTYPES`. bf16 is the upper half of a float32, so it is widened by
    a 16-bit shift into the output buffer: one pass, no temporary float array. ``tee`` sees the stored bytes
    (uint8) before they are decoded, so another check can use the same read.
    """
    import numpy as np

    count = math.prod(shape)
    if dtype == "F32":
        out = np.empty(shape, dtype="<f4")
        read_into(fd, offset, out, label)
        if tee is not None:
            tee(out.reshape(-1).view(np.uint8))
        return out if out.dtype == np.float32 else out.astype(np.float32)
    raw = np.empty(count, dtype={"F16": "<f2", "BF16": "<u2", "F64": "<f8"}[dtype])
    read_into(fd, offset, raw, label)
    if tee is not None:
        tee(raw.view(np.uint8))
    if dtype == "BF16":
        out = np.empty(count, dtype=np.float32)
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out.reshape(shape)
    return raw.astype(np.float32).reshape(shape)
