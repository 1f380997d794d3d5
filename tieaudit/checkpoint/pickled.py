"""Reading pickled PyTorch checkpoints (``pytorch_model.bin``) without ever running their code.

Only ``torch.load(..., weights_only=True)`` is used: its restricted unpickler refuses any global that is
not a plain tensor type, so a ``__reduce__`` payload is rejected before it can execute. torch is imported
inside the functions so that importing this module (and opening safetensors checkpoints) stays cheap.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.checkpoint.safetensors_header import open_regular_file, read_exact
from tieaudit.checkpoint.types import TensorInfo
from tieaudit.errors import InputError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> name of the torch dtype attribute
TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip

_ZIP_MAGIC = b"PK\x03\x04"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 160
# Lines of torch's weights_only error text that explain torch, not the file.
_BOILERPLATE = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please file an issue")


@dataclass
class BinFile:
    """A loaded .bin file: the (memory-mapped when possible) tensors and their descriptions."""

    rel: str
    tensors: dict[str, torch.Tensor]
    infos: dict[str, TensorInfo]
    header_bytes: int  # bytes read eagerly to load it (pickle + zip records, or the whole legacy file)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    dtype: torch.dtype = getattr(torch, TORCH_DTYPE_NAMES[code])
    return dtype


def dtype_code(dtype: torch.dtype) -> str | None:
    """The safetensors dtype code of a torch dtype, or None when safetensors has no code we support."""
    import torch

    for code, name in TORCH_DTYPE_NAMES.items():
        if getattr(torch, name, None) == dtype:
            return code
    return None


def load_bin(path: Path, rel: str) -> BinFile:
    """Load a .bin checkpoint safely and describe its tensors; InputError for anything but a flat name->tensor dict.

    Tensors that share a storage get the same ``storage_id``: that is how tied weights look in a .bin.
    """
    is_zip, size = _probe(path, rel)
    obj = _torch_load(path, rel, mmap=is_zip)
    tensors = _as_state_dict(obj, rel)
    infos, storage_bytes = _describe(tensors, rel)
    # mmap'd zip: only the pickle and zip records are read up front; legacy files are read whole.
    header_bytes = max(size - storage_bytes, 0) if is_zip else size
    return BinFile(rel=rel, tensors=tensors, infos=infos, header_bytes=header_bytes)


def _probe(path: Path, rel: str) -> tuple[bool, int]:
    """(is a zip-format torch.save file, size); also refuses non-regular files before torch opens the path."""
    fd = open_regular_file(path, rel)
    try:
        size = os.fstat(fd).st_size
        head = bytes(read_exact(fd, 0, min(4, size), rel))
    finally:
        os.close(fd)
    return head == _ZIP_MAGIC, size


def _torch_load(path: Path, rel: str, *, mmap: bool) -> Any:
    """torch.load with weights_only=True; mmap only for zip files (legacy files cannot be mapped)."""

    import torch

    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": noise for a user of tieaudit, the outcome is what matters.
            warnings.simplefilter("ignore")
            if mmap:
                return torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"refusing {rel}: it is not a plain tensor checkpoint "
            f"(the pickle would run code or uses unsupported types): {_short_reason(exc)}"
        ) from None
    except Exception as exc:  # corrupt zip, truncated pickle, ...: torch raises many types
        raise InputError(f"{rel}: cannot load as a PyTorch checkpoint: {_short_reason(exc)}") from None


def _short_reason(exc: BaseException) -> str:
    """One line from torch's long error text: the WeightsUnpickler reason, without torch's boilerplate."""
    text = _ANSI.sub("", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_BOILERPLATE)]
    first = (useful or lines or [type(exc).__name__])[0]
    first = first.split(". Please", 1)[0].rstrip(".")
    return first if len(first) <= _MAX_REASON else first[: _MAX_REASON - 3] + "..."


def _as_state_dict(obj: Any, rel: str) -> dict[str, torch.Tensor]:
    """The loaded object must be a flat dict of name -> dense CPU tensor (what a state_dict is)."""
    import torch

    if not isinstance(obj, dict):
        raise InputError(f"{rel}: expected a dict of name -> tensor, got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InputError(
                f"{rel}: expected a dict of name -> tensor, but entry {str(name)[:80]!r} is {type(value).__name__}"
            )
        if value.layout != torch.strided:
            raise InputError(f"{rel}: tensor {name!r} has unsupported layout {value.layout}")
    return dict(obj)


def _describe(tensors: dict[str, torch.Tensor], rel: str) -> tuple[dict[str, TensorInfo], int]:
    """TensorInfo for every tensor, and the total size of the distinct storages."""
    infos: dict[str, TensorInfo] = {}
    storages: dict[str, int] = {}
    for name, tensor in tensors.items():
        code = dtype_code(tensor.dtype)
        if code is None:
            raise InputError(f"{rel}: tensor {name!r} has unsupported dtype {tensor.dtype}")
        storage = tensor.untyped_storage()
        # Empty storages may all report data_ptr 0; they must not look shared (i.e. tied) with each other.
        key = str(storage.data_ptr()) if storage.nbytes() > 0 else f"empty:{name}"
        storages[key] = storage.nbytes()
        infos[name] = TensorInfo(
            name=name,
            file=rel,
            dtype=code,
            shape=tuple(tensor.shape),
            nbytes=tensor.numel() * tensor.element_size(),
            storage_id=(rel, key),
        )
    return infos, sum(storages.values())


def read_bin_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a loaded tensor as a contiguous copy (never a view of the mmap); 0-d: the value."""
    import torch

    source = tensor if tensor.dim() == 0 else tensor[start:stop]
    return source.clone(memory_format=torch.contiguous_format)
