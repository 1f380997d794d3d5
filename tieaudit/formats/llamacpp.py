"""How llama.cpp's loader treats a GGUF file's LM head (``output.weight``), per architecture, as read from llama.cpp's
own sources by `tools/llamacpp_table.py` (``llamacpp_output.json`` beside this module names the commit).

Rules (``general.architecture`` -> rule):

- ``fallback``: ``output.weight`` is optional; without it the input embedding ``token_embd.weight`` is the head (the
  file is tied);
- ``required``: without ``output.weight`` the file does not load;
- ``embedding``: the head is always ``token_embd.weight``; a file holding ``output.weight`` does not load;
- ``absent``: no head is loaded; a file holding ``output.weight`` does not load;
- ``optional``: ``output.weight`` is optional and nothing replaces it (draft models use their target's head).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("llamacpp_output.json")
RULES = ("fallback", "required", "embedding", "absent", "optional")


@dataclass(frozen=True)
class HeadRule:
    architecture: str
    rule: str
    source: str  # the llama.cpp file the rule was read from
    statement: str  # the statement that creates the head (empty: none does)
    commit: str  # the llama.cpp commit

    @property
    def ties_when_absent(self) -> bool:
        """A file without ``output.weight`` runs with ``token_embd.weight`` as its head."""
        return self.rule in ("fallback", "embedding")

    @property
    def refuses_output(self) -> bool:
        """A file holding ``output.weight`` does not load (the loader never creates it)."""
        return self.rule in ("embedding", "absent")


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(TABLE.read_text(encoding="utf-8"))
    return data


def head_rule(architecture: str | None) -> HeadRule | None:
    """The loader's rule for ``architecture`` (None: llama.cpp, at the recorded commit, has no such architecture)."""
    if architecture is None:
        return None
    table = _table()
    entry = table["architectures"].get(architecture)
    if entry is None:
        return None
    return HeadRule(architecture, entry["rule"], entry["source"], entry["statement"], table["llama_cpp_commit"])


def commit() -> str:
    return str(_table()["llama_cpp_commit"])
