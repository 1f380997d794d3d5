"""Data types of the read-only checkpoint layer (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# safetensors dtype code -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor, as its file describes it (names are on-disk names)."""

    name: str
    file: str  # path relative to the checkpoint root
    dtype: str  # safetensors dtype code ("F32", "BF16", ...), also for .bin files
    shape: tuple[int, ...]
    nbytes: int
    # Identity of the storage the tensor lives in, for pickled (.bin) checkpoints only:
    # (file, storage key). Two names with the same storage_id share memory: they were tied when saved.
    storage_id: tuple[str, str] | None = None


@dataclass(frozen=True)
class ConfigFile:
    """A parsed JSON config with the line of every key (JSON pointer -> 1-based line)."""

    rel: str
    data: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, pointer: str) -> int | None:
        """Line of a JSON pointer such as ``/text_config/tie_word_embeddings``, or None when absent."""
        return self.lines.get(pointer)


@dataclass(frozen=True)
class IndexMismatch:
    """The shard index and the shard files disagree about one tensor."""

    tensor: str
    indexed_file: str | None  # where the index says it is (None: not in the index)
    actual_file: str | None  # where it really is (None: in no shard)


@dataclass
class ReadStats:
    """Bytes read so far: headers/indices/configs versus tensor data."""

    header_bytes: int = 0
    tensor_bytes: int = 0
