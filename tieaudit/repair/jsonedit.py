"""Edit JSON files with the smallest textual change, so a fix shows up as a one-line diff.

Pure functions over text. A value is replaced on the line of its key; an absent key is inserted after the
opening brace of its object. When the file's layout defeats that (minified JSON, a key sharing its line
with another), the whole document is re-serialised with the file's indentation. Either way the result is
checked to parse to exactly the intended data.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from tieaudit.checkpoint.config import join_pointer, line_map, pointer_parts


def set_pointer(data: dict[str, Any], pointer: str, value: Any) -> None:
    """Set ``pointer`` in ``data`` (objects only; parents must exist)."""
    parts = pointer_parts(pointer)
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def set_json_values(text: str, changes: Mapping[str, Any]) -> str:
    """``text`` with every JSON pointer of ``changes`` set to its value."""
    expected = copy.deepcopy(json.loads(text))
    for pointer, value in changes.items():
        set_pointer(expected, pointer, value)
    edited: str | None = text
    for pointer, value in changes.items():
        edited = _edit_line(edited, pointer, value) if edited is not None else None
    if edited is not None:
        try:
            if json.loads(edited) == expected:
                return edited
        except json.JSONDecodeError:
            pass
    return dump_like(text, expected)


def dump_like(original: str, data: Any) -> str:
    """Serialise ``data`` with the indentation (and final newline) of ``original``."""
    indent = _indent_of(original)
    out = json.dumps(data, indent=indent, ensure_ascii=False)
    return out + "\n" if original.endswith("\n") or indent is not None else out


def _indent_of(text: str) -> int | None:
    match = re.search(r"\n( +)\S", text)
    return len(match.group(1)) if match else None


def _edit_line(text: str, pointer: str, value: Any) -> str | None:
    """Replace (or insert) one scalar value on its own line; None when the layout does not allow it."""
    parts = pointer_parts(pointer)
    if not parts:
        return None
    lines = line_map(text)
    key_json = json.dumps(parts[-1], ensure_ascii=False)
    rows = text.split("\n")
    literal = json.dumps(value, ensure_ascii=False)
    if pointer in lines:
        row = rows[lines[pointer] - 1]
        scalar = r'(?:true|false|null|-?\d[\d.eE+-]*|"(?:[^"\\]|\\.)*")'
        pattern = re.compile(re.escape(key_json) + r"(\s*:\s*)" + scalar)
        if len(pattern.findall(row)) != 1:
            return None
        rows[lines[pointer] - 1] = pattern.sub(lambda m: key_json + m.group(1) + literal, row, count=1)
        return "\n".join(rows)
    parent = join_pointer(parts[:-1])
    parent_line = lines.get(parent)
    if parent_line is None:
        return None
    row = rows[parent_line - 1]
    if not row.rstrip().endswith("{") or parent_line >= len(rows):
        return None
    following = rows[parent_line]
    indent = following[: len(following) - len(following.lstrip())]
    if following.strip().startswith("}"):
        return None  # an empty object: re-serialise instead
    rows.insert(parent_line, f"{indent}{key_json}: {literal},")
    return "\n".join(rows)
