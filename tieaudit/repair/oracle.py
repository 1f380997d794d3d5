"""The planner's questions, answered by transformers and the weight files (see `plan.Oracle`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.checkpoint.config import escape_pointer_token
from tieaudit.checkpoint.types import ConfigFile
from tieaudit.ties.compare import diff_tensors
from tieaudit.ties.declared import declared_ties, quiet_libraries
from tieaudit.ties.graph import PairState, cast_reader, compare_dtype

if TYPE_CHECKING:
    from tieaudit.checkpoint import Checkpoint

_IGNORED_KEYS = frozenset({"tie_word_embeddings", "transformers_version", "_name_or_path"})


class LibraryOracle:
    def __init__(self, ckpt: Checkpoint, load_dtype: str | None) -> None:
        self.ckpt = ckpt
        self.load_dtype = load_dtype

    def active_ties(self, config_data: dict[str, Any]) -> dict[str, str]:

        with tempfile.TemporaryDirectory(prefix="tieaudit-config-") as tmp:
            text = json.dumps(config_data, indent=2)
            (Path(tmp) / "config.json").write_text(text, encoding="utf-8")
            return dict(declared_ties(Path(tmp), ConfigFile("config.json", config_data)).active)

    def config_drift(self, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        before, after = _effective(old), _effective(new)
        drift: dict[str, Any] = {}
        _diff(before, after, "", drift)
        return drift

    def pairs_equal(self, pair: PairState) -> bool:

        s, t = pair.source_info, pair.target_info
        if s is None or t is None or s.shape != t.shape:
            return False
        cast = compare_dtype(self.load_dtype, s, t)
        if cast is None and s.dtype != t.dtype:
            return False
        return diff_tensors(
            cast_reader(self.ckpt, s.name, cast), cast_reader(self.ckpt, t.name, cast), s.shape
        ).bitwise_equal


def _effective(data: dict[str, Any]) -> dict[str, Any]:
    """The config as transformers reads it (defaults and derived values applied)."""
    import transformers

    with tempfile.TemporaryDirectory(prefix="tieaudit-config-") as tmp, quiet_libraries():
        (Path(tmp) / "config.json").write_text(json.dumps(data), encoding="utf-8")
        cfg = transformers.AutoConfig.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        result: dict[str, Any] = cfg.to_dict()
        return result


def _diff(before: Any, after: Any, pointer: str, out: dict[str, Any]) -> None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in before.keys() | after.keys():
            if key in _IGNORED_KEYS:
                continue
            _diff(before.get(key), after.get(key), f"{pointer}/{escape_pointer_token(str(key))}", out)
        return
    if before != after:
        out[pointer] = before
