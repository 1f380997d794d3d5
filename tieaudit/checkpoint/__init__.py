"""Read-only access to Hugging Face checkpoints: layout discovery, strict headers, row-range reads."""

from tieaudit.checkpoint.config import read_config
from tieaudit.checkpoint.layout import Checkpoint, open_checkpoint
from tieaudit.checkpoint.safetensors_header import parse_header
from tieaudit.checkpoint.types import DTYPE_SIZES, ConfigFile, IndexMismatch, ReadStats, TensorInfo

__all__ = [
    "DTYPE_SIZES",
    "Checkpoint",
    "ConfigFile",
    "IndexMismatch",
    "ReadStats",
    "TensorInfo",
    "open_checkpoint",
    "parse_header",
    "read_config",
]
