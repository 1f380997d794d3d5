"""Checkpoint discovery and the read-only :class:`Checkpoint`.

``open_checkpoint`` finds the weights the way a loader would (index first, then single files), validates
every file before reading it (no symlinks out of the directory, no FIFOs or devices), and reads only
headers. Tensor data is read later, row range by row range, and every byte is counted in ``stats``.
"""

from __future__ import annotations

import math
import os
import stat
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tieaudit.checkpoint.arrays import NUMPY_FLOAT_DTYPES, Scratch, Tee, read_float32
from tieaudit.checkpoint.config import load_json, read_config
from tieaudit.checkpoint.pickled import BinFile, load_bin, read_bin_rows, torch_dtype
from tieaudit.checkpoint.safetensors_header import SafetensorsHeader, open_regular_file, read_exact, read_header_fd
from tieaudit.checkpoint.types import DTYPE_SIZES, ConfigFile, IndexMismatch, ReadStats, TensorInfo
from tieaudit.errors import InputError, NothingToAudit, TieauditError

if TYPE_CHECKING:
    import numpy as np
    import torch

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = (("adapter_model.safetensors", "safetensors"), ("adapter_model.bin", "bin"))
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass
class _Plan:
    """What discovery decided to read."""

    kind: str
    layout: str
    weight_files: list[str]
    index_file: str | None = None
    weight_map: dict[str, str] = field(default_factory=dict)
    config: str | None = None
    adapter_config: str | None = None


class _SafetensorsSource:
    """An open safetensors file: reads row ranges with pread at the offsets its header gives."""

    def __init__(self, rel: str, fd: int, header: SafetensorsHeader) -> None:
        self.rel = rel
        self.fd = fd
        self.header = header

    def read(self, info: TensorInfo, start: int, stop: int, row_bytes: int) -> torch.Tensor:
        """Rows [start, stop) as a fresh tensor of the stored dtype."""
        import torch

        begin, _ = self.header.offsets[info.name]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        length = (stop - start) * row_bytes
        if length == 0:  # torch.frombuffer refuses empty buffers
            return torch.empty(shape, dtype=torch_dtype(info.dtype))
        buf = read_exact(self.fd, self.header.data_start + begin + start * row_bytes, length, self.rel)
        return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(shape)

    def read_float32(
        self,
        info: TensorInfo,
        start: int,
        stop: int,
        row_bytes: int,
        tee: Tee | None = None,
        scratch: Scratch | None = None,
    ) -> np.ndarray | None:
        """Rows [start, stop) as float32 decoded by numpy (None: a dtype numpy cannot decode exactly)."""
        if info.dtype not in NUMPY_FLOAT_DTYPES:
            return None
        begin, _ = self.header.offsets[info.name]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        offset = self.header.data_start + begin + start * row_bytes
        return read_float32(self.fd, offset, info.dtype, shape, self.rel, tee, scratch)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _BinSource:
    """A loaded .bin file; its tensors are memory-mapped when the file is zip-format."""

    def __init__(self, loaded: BinFile) -> None:
        self.loaded: BinFile | None = loaded

    def read(self, info: TensorInfo, start: int, stop: int, row_bytes: int) -> torch.Tensor:
        """Rows [start, stop) as a copy."""
        if self.loaded is None:
            raise ValueError("checkpoint is closed")
        return read_bin_rows(self.loaded.tensors[info.name], start, stop)

    def read_float32(
        self,
        info: TensorInfo,
        start: int,
        stop: int,
        row_bytes: int,
        tee: Tee | None = None,
        scratch: Scratch | None = None,
    ) -> np.ndarray | None:
        """Pickled tensors are read through torch (None: let the caller convert)."""
        return None

    def close(self) -> None:
        """Drop the tensors so the mapping can be released."""
        self.loaded = None


_Source = _SafetensorsSource | _BinSource


def _close_sources(sources: dict[str, _Source]) -> None:
    """Finalizer body: close every source once."""
    for source in sources.values():
        source.close()
    sources.clear()


class Checkpoint:
    """A checkpoint directory opened read-only: file layout, tensor descriptions and row-range reads."""

    root: Path
    kind: str
    layout: str
    files: tuple[str, ...]
    weight_files: tuple[str, ...]
    config: ConfigFile | None
    adapter_config: ConfigFile | None
    index_file: str | None
    tensors: dict[str, TensorInfo]
    metadata: dict[str, dict[str, str]]
    index_mismatches: tuple[IndexMismatch, ...]
    stats: ReadStats

    def __init__(self, root: Path, plan: _Plan, stats: ReadStats) -> None:
        """Use :func:`open_checkpoint`; this only sets the fields, ``_load`` reads the files."""
        self.root = root
        self.kind = plan.kind
        self.layout = plan.layout
        self.weight_files = tuple(sorted(plan.weight_files))
        used = [plan.config, plan.adapter_config, plan.index_file, *plan.weight_files]
        self.files = tuple(sorted({rel for rel in used if rel is not None}))
        self.index_file = plan.index_file
        self.config = None
        self.adapter_config = None
        self.tensors = {}
        self.metadata = {}
        self.index_mismatches = ()
        self.stats = stats
        self._sources: dict[str, _Source] = {}
        # Descriptors are closed even if the caller forgets close(); close() runs the same finalizer.
        self._finalizer = weakref.finalize(self, _close_sources, self._sources)

    def __repr__(self) -> str:
        return f"Checkpoint(root={str(self.root)!r}, kind={self.kind!r}, layout={self.layout!r})"

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open weight file (idempotent)."""
        self._finalizer()

    def row_count(self, name: str) -> int:
        """Number of rows along dim 0 (1 for a 0-d tensor)."""
        shape = self.tensors[name].shape
        return shape[0] if shape else 1

    def row_bytes(self, name: str) -> int:
        """Bytes of one row (for a 0-d tensor: its element)."""
        info = self.tensors[name]
        return math.prod(info.shape[1:]) * DTYPE_SIZES[info.dtype]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` along dim 0, in the stored dtype, as a fresh copy.

        A 1-D tensor's rows are its elements; a 0-d tensor is one row (``read_rows(name, 0, 1)`` returns
        it with shape ``()``). The bytes requested are added to ``stats.tensor_bytes``.
        """
        info, source, row_bytes = self._rows_source(name, start, stop)
        tensor = source.read(info, start, stop, row_bytes)
        self.stats.tensor_bytes += (stop - start) * row_bytes
        return tensor

    def _rows_source(self, name: str, start: int, stop: int) -> tuple[TensorInfo, _Source, int]:
        """The tensor, its open file and its row size, once the row range is checked."""
        info = self.tensors[name]
        rows = self.row_count(name)
        if not (0 <= start <= stop <= rows):
            raise ValueError(f"rows [{start}, {stop}) out of range for {name!r} with {rows} rows")
        source = self._sources.get(info.file)
        if source is None:
            raise ValueError("checkpoint is closed")
        return info, source, self.row_bytes(name)

    def read_float32(
        self,
        name: str,
        start: int,
        stop: int,
        tee: Callable[[int, np.ndarray], None] | None = None,
        scratch: Scratch | None = None,
    ) -> np.ndarray:
        """Rows [start, stop) of tensor ``name`` as a float32 numpy array (see :meth:`read_rows`): a fresh one, or,
        with ``scratch``, one in its refilled memory, valid until the next read through it.

        bf16, f16 and f32 are decoded exactly by numpy, without importing torch; other dtypes and pickled
        tensors are read with :meth:`read_rows` and converted. ``tee(start, stored bytes)`` sees the stored bytes
        of a safetensors read before decoding (it is not called for other reads)."""
        info, source, row_bytes = self._rows_source(name, start, stop)
        raw_tee = None if tee is None else (lambda raw: tee(start, raw))
        out = source.read_float32(info, start, stop, row_bytes, raw_tee, scratch)
        if out is None:
            import torch

            return self.read_rows(name, start, stop).to(torch.float32).numpy()
        self.stats.tensor_bytes += (stop - start) * row_bytes
        return out

    def byte_range(self, name: str) -> tuple[int, int, int] | None:
        """For a tensor of a safetensors file: (open descriptor, absolute offset, length); None for .bin tensors.

        Lets a writer copy the stored bytes file-to-file (``os.copy_file_range``) without materialising them.
        The caller adds what it copies to ``stats.tensor_bytes``."""
        info = self.tensors[name]
        source = self._sources.get(info.file)
        if not isinstance(source, _SafetensorsSource) or source.fd < 0:
            return None
        begin, end = source.header.offsets[info.name]
        return source.fd, source.header.data_start + begin, end - begin

    def file_tensors(self, rel: str) -> list[TensorInfo]:
        """The tensors one weight file holds, in stored order (as its header or pickle lists them)."""
        source = self._sources.get(rel)
        if isinstance(source, _SafetensorsSource):
            return sorted(source.header.tensors.values(), key=lambda i: source.header.offsets[i.name][0])
        if isinstance(source, _BinSource) and source.loaded is not None:
            return list(source.loaded.infos.values())
        raise ValueError(f"{rel} is not an open weight file of this checkpoint")

    def file_metadata(self, rel: str) -> dict[str, str]:
        """The ``__metadata__`` of a safetensors file ({} for .bin)."""
        return dict(self.metadata.get(rel, {}))

    def bin_state(self, rel: str) -> dict[str, torch.Tensor]:
        """The (memory-mapped) state dict of a .bin file, storages shared as pickled."""
        source = self._sources.get(rel)
        if not isinstance(source, _BinSource) or source.loaded is None:
            raise ValueError(f"{rel} is not an open .bin file of this checkpoint")
        return dict(source.loaded.tensors)

    def iter_rows(self, name: str, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start_row, chunk)`` covering the whole tensor, each chunk at most ``max_chunk_bytes``.

        A chunk holds at least one row even when one row is larger than the bound; a tensor with zero
        rows yields nothing.
        """
        if max_chunk_bytes < 1:
            raise ValueError("max_chunk_bytes must be positive")
        rows = self.row_count(name)
        row_bytes = self.row_bytes(name)
        step = max(1, max_chunk_bytes // row_bytes) if row_bytes else max(rows, 1)
        for start in range(0, rows, step):
            yield start, self.read_rows(name, start, min(start + step, rows))

    def _load(self, plan: _Plan) -> None:
        """Read configs and weight headers, then reconcile the index with the shards."""
        if plan.config is not None:
            self.config = read_config(self.root, plan.config, self.stats)
        if plan.adapter_config is not None:
            self.adapter_config = read_config(self.root, plan.adapter_config, self.stats)
        contents: dict[str, dict[str, TensorInfo]] = {}
        for rel in self.weight_files:
            contents[rel] = self._open_weight_file(rel)
        self.tensors, duplicates = _merge(contents, plan.weight_map, plan.index_file)
        if plan.index_file is not None:
            self.index_mismatches = _index_mismatches(plan.weight_map, self.tensors, duplicates)

    def _open_weight_file(self, rel: str) -> dict[str, TensorInfo]:
        """Open one weight file, register its source, and return its tensors."""
        path = _checked_file(self.root, rel)
        if path is None:
            raise InputError(f"{rel}: file does not exist")
        if rel.endswith(".bin"):
            loaded = load_bin(path, rel)
            self._sources[rel] = _BinSource(loaded)
            self.stats.header_bytes += loaded.header_bytes
            self.metadata[rel] = {}
            return loaded.infos
        fd = open_regular_file(path, rel)
        source = _SafetensorsSource(rel, fd, _EMPTY_HEADER)
        self._sources[rel] = source  # registered first so close() releases the fd if the header is bad
        source.header = read_header_fd(fd, rel)
        self.stats.header_bytes += source.header.data_start
        self.metadata[rel] = source.header.metadata
        return source.header.tensors


_EMPTY_HEADER = SafetensorsHeader(tensors={}, offsets={}, metadata={}, data_start=0, file_size=0)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open the checkpoint directory at ``path`` read-only.

    Raises NothingToAudit when it holds no weights, InputError for anything missing, unsafe or corrupt.
    Only configs, indices and headers are read here; ``stats.tensor_bytes`` is 0 afterwards.
    """
    display = os.fspath(path)
    try:
        root = _resolve_root(display)
        stats = ReadStats()
        plan = _discover(root, display, stats)
        checkpoint = Checkpoint(root, plan, stats)
        try:
            checkpoint._load(plan)
        except BaseException:
            checkpoint.close()
            raise
        return checkpoint
    except TieauditError:
        raise
    except (OSError, ValueError) as exc:  # permissions, ELOOP, names with NUL bytes, ...
        raise InputError(f"cannot read checkpoint at {display}: {exc}") from None


def _resolve_root(display: str) -> Path:
    """The resolved checkpoint directory, or InputError when ``display`` is missing or not a directory."""
    if not os.path.lexists(display):
        raise InputError(f"path does not exist: {display}")
    try:
        mode = os.stat(display).st_mode
    except FileNotFoundError:
        raise InputError(f"path does not exist: {display} (broken symlink)") from None
    if stat.S_ISREG(mode):
        raise InputError(f"expected a checkpoint directory, got a file: {display}")
    if not stat.S_ISDIR(mode):
        raise InputError(f"expected a checkpoint directory, got a special file: {display}")
    return Path(display).resolve()


def _discover(root: Path, display: str, stats: ReadStats) -> _Plan:
    """Decide kind, layout and weight files the way transformers/peft would look for them."""
    config = CONFIG if _checked_file(root, CONFIG) else None
    if _checked_file(root, ADAPTER_CONFIG):
        return _discover_adapter(root, display, config)
    if _checked_file(root, SAFETENSORS_INDEX):
        weight_map = _read_index(root, SAFETENSORS_INDEX, stats)
        shards = sorted(set(weight_map.values()))
        layout = "safetensors-sharded"
        return _Plan("model", layout, shards, SAFETENSORS_INDEX, weight_map, config=config)
    if _checked_file(root, SAFETENSORS_SINGLE):
        return _Plan("model", "safetensors", [SAFETENSORS_SINGLE], config=config)
    if _checked_file(root, BIN_INDEX):
        weight_map = _read_index(root, BIN_INDEX, stats)
        return _Plan("model", "bin", sorted(set(weight_map.values())), BIN_INDEX, weight_map, config=config)
    if _checked_file(root, BIN_SINGLE):
        return _Plan("model", "bin", [BIN_SINGLE], config=config)
    return _discover_fallback(root, display, config)


def _discover_adapter(root: Path, display: str, config: str | None) -> _Plan:
    """A PEFT adapter directory: adapter_model.safetensors preferred over adapter_model.bin, as peft does."""
    for rel, layout in ADAPTER_WEIGHTS:
        if _checked_file(root, rel):
            return _Plan("adapter", layout, [rel], config=config, adapter_config=ADAPTER_CONFIG)
    raise NothingToAudit(
        f"{ADAPTER_CONFIG} found at {display} but no adapter weights (adapter_model.safetensors / adapter_model.bin)"
    )


def _discover_fallback(root: Path, display: str, config: str | None) -> _Plan:
    """Non-standard names: every *.safetensors in the root, else every pytorch_model*.bin."""
    names = sorted(os.listdir(root))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    for rel in safetensors or bins:
        _checked_file(root, rel)  # symlink and file-type checks, before anything is opened
    if safetensors:
        layout = "safetensors-sharded" if len(safetensors) > 1 else "safetensors"
        return _Plan("model", layout, safetensors, config=config)
    if bins:
        return _Plan("model", "bin", bins, config=config)
    if config is not None:
        raise NothingToAudit(
            f"{CONFIG} found at {display} but no weights: no *.safetensors or pytorch_model*.bin files next to it"
        )
    raise NothingToAudit(
        f"nothing auditable at {display}: no {CONFIG} and no *.safetensors / pytorch_model*.bin weights"
    )


def _checked_file(root: Path, rel: str) -> Path | None:
    """``root/rel`` resolved, None when absent; InputError when it escapes ``root`` or is not a regular file."""
    candidate = root / rel
    if not os.path.lexists(candidate):
        return None
    real = Path(os.path.realpath(candidate))
    if not _inside(real, root):
        raise InputError(f"{rel} is a symlink to {real}, outside the checkpoint directory; refusing to follow it")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise InputError(f"{rel} is a broken symlink") from None
    except OSError as exc:
        raise InputError(f"{rel}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{rel} is not a regular file (FIFO, device or directory); refusing to read it")
    return real


def _inside(real: Path, root: Path) -> bool:
    """Whether a resolved path stays in the checkpoint.

    One exception: a Hugging Face cache snapshot (``.../snapshots/<rev>``) holds symlinks to
    ``../../blobs/<hash>`` of the same repository; those are the checkpoint's own files.
    """
    if real.is_relative_to(root):
        return True
    return root.parent.name == "snapshots" and real.is_relative_to(root.parent.parent / "blobs")


def _read_index(root: Path, rel: str, stats: ReadStats) -> dict[str, str]:
    """The validated ``weight_map`` of a shard index (tensor name -> normalized shard path)."""
    data, _ = load_json(root, rel, stats)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f'{rel}: expected a JSON object with a "weight_map" object')
    if not weight_map:
        raise InputError(f"{rel}: weight_map is empty")
    normalized: dict[str, str] = {}
    checked: dict[str, str] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(f"{rel}: weight_map entry {name[:80]!r} is not a string shard name")
        if shard not in checked:
            checked[shard] = _check_shard(root, rel, shard)
        normalized[name] = checked[shard]
    return normalized


def _check_shard(root: Path, index_rel: str, shard: str) -> str:
    """Normalize a shard name from an index; it must stay inside the root and exist."""
    pure = PurePosixPath(shard)
    if not shard or "\x00" in shard or "\\" in shard or pure.is_absolute() or ".." in pure.parts:
        raise InputError(f"{index_rel} names shard {shard[:120]!r}, which is outside the checkpoint directory")
    rel = pure.as_posix()
    if _checked_file(root, rel) is None:
        raise InputError(f"{index_rel} names shard {rel}, which does not exist")
    return rel


def _merge(
    contents: dict[str, dict[str, TensorInfo]], weight_map: dict[str, str], index_file: str | None
) -> tuple[dict[str, TensorInfo], list[TensorInfo]]:
    """All tensors by name; a name stored in two files keeps the copy the index points to.

    Returns the extra copies too (index mismatches). Without an index there is no way to tell which copy a
    loader uses, so that is an input error.
    """
    tensors: dict[str, TensorInfo] = {}
    extra: list[TensorInfo] = []
    for rel in sorted(contents):
        for name, info in contents[rel].items():
            previous = tensors.get(name)
            if previous is None:
                tensors[name] = info
                continue
            if index_file is None:
                raise InputError(f"tensor {name!r} is stored in both {previous.file} and {info.file}")
            if weight_map.get(name) == info.file:
                tensors[name], info = info, previous
            extra.append(info)
    return tensors, extra


def _index_mismatches(
    weight_map: dict[str, str], tensors: dict[str, TensorInfo], extra: list[TensorInfo]
) -> tuple[IndexMismatch, ...]:
    """Disagreements between the index and what the shards really hold, sorted by tensor name."""
    found: list[IndexMismatch] = []
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file != shard:
            found.append(IndexMismatch(tensor=name, indexed_file=shard, actual_file=info.file if info else None))
    for name, info in tensors.items():
        if name not in weight_map:
            found.append(IndexMismatch(tensor=name, indexed_file=None, actual_file=info.file))
    for info in extra:
        found.append(IndexMismatch(tensor=info.name, indexed_file=weight_map.get(info.name), actual_file=info.file))
    return tuple(sorted(found, key=lambda m: (m.tensor, m.indexed_file or "", m.actual_file or "")))
