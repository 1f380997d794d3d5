"""JSON config reading with a JSON-pointer -> line map (no torch import).

Python's json module reports no positions, so a small scanner walks the (already validated) text to find
the line where every key and array element starts; findings can then point at ``config.json:12``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tieaudit.checkpoint.pickled import TORCH_DTYPE_NAMES
from tieaudit.checkpoint.safetensors_header import open_regular_file, read_exact
from tieaudit.checkpoint.types import ConfigFile, ReadStats
from tieaudit.errors import InputError

# Configs and shard indices are kilobytes; anything this large is not a config and would only waste memory.
MAX_JSON_BYTES = 64 * 2**20

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(r"[^ \t\r\n,:\[\]{}\"]+")


def load_json(root: Path, rel: str, stats: ReadStats | None = None) -> tuple[Any, str]:
    """Read ``root/rel`` as UTF-8 JSON and return ``(value, text)``; InputError for anything unreadable."""
    text = _read_text(root / rel, rel, stats)
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise InputError(f"{rel}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise InputError(f"{rel}: invalid JSON: nested too deeply") from None


def read_config(root: Path, rel: str, stats: ReadStats | None = None) -> ConfigFile:
    """Read a JSON config (``config.json``, ``adapter_config.json``) that must be an object, with its line map."""
    data, text = load_json(root, rel, stats)
    if not isinstance(data, dict):
        raise InputError(f"{rel}: expected a JSON object at the top level, got {type(data).__name__}")
    return ConfigFile(rel=rel, data=data, lines=line_map(text))


def _read_text(path: Path, rel: str, stats: ReadStats | None) -> str:
    """Read a small UTF-8 file, refusing non-regular and oversized files before reading them."""
    fd = open_regular_file(path, rel)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{rel}: {size} bytes is too large for a JSON config (limit {MAX_JSON_BYTES})")
        raw = bytes(read_exact(fd, 0, size, rel))
    finally:
        os.close(fd)
    if stats is not None:
        stats.header_bytes += len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{rel}: not valid UTF-8 (byte {exc.start})") from None
    # Some editors on Windows prepend a BOM; json.loads refuses it though the content is fine.
    return text.removeprefix("\ufeff")


def escape_pointer_token(key: str) -> str:
    """Escape one reference token per RFC 6901: '~' -> '~0', '/' -> '~1' (in that order)."""
    return key.replace("~", "~0").replace("/", "~1")


def pointer_parts(pointer: str) -> list[str]:
    """The unescaped reference tokens of a JSON pointer (``""`` is the root: no tokens)."""
    tokens = pointer.strip("/")
    return [t.replace("~1", "/").replace("~0", "~") for t in tokens.split("/")] if tokens else []


def join_pointer(parts: list[str]) -> str:
    """The JSON pointer of unescaped reference tokens (the inverse of :func:`pointer_parts`)."""
    return "".join(f"/{escape_pointer_token(p)}" for p in parts)


def literal(value: Any) -> str:
    """A config value as messages show it: JSON's `true`/`false` for booleans, else Python's repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def get_pointer(data: Any, pointer: str, missing: Any = None) -> Any:
    """The value at ``pointer`` (``missing`` when any part is absent)."""
    node = data
    for part in pointer_parts(pointer):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


@dataclass
class _Container:
    """An object or array the scanner is inside of."""

    pointer: str
    is_object: bool
    index: int = 0  # next array element
    expect_key: bool = True  # objects: the next string is a key
    key_pointer: str = ""  # objects: pointer of the key whose value comes next


def line_map(text: str) -> dict[str, int]:
    """Map every JSON pointer in valid JSON ``text`` to the 1-based line where its key (or element) starts.

    The root is ``""``. Iterative, so deeply nested input cannot exhaust the Python stack. Duplicate keys
    map to their last occurrence, matching json.loads (which keeps the last value).
    """
    lines: dict[str, int] = {}
    stack: list[_Container] = []
    pos, line, end = 0, 1, len(text)
    while True:
        pos, line = _skip_whitespace(text, pos, line)
        if pos >= end:
            return lines
        ch = text[pos]
        if ch in ",:":
            if ch == "," and stack and stack[-1].is_object:
                stack[-1].expect_key = True
            pos += 1
        elif ch in "}]":
            stack.pop()
            pos += 1
        elif stack and stack[-1].is_object and stack[-1].expect_key:
            pos = _scan_key(text, pos, line, stack[-1], lines)
        else:
            pos = _scan_value(text, pos, line, stack, lines)


def _skip_whitespace(text: str, pos: int, line: int) -> tuple[int, int]:
    """Skip JSON whitespace, counting newlines."""
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end(), line + text.count("\n", pos, match.end())


def _scan_key(text: str, pos: int, line: int, container: _Container, lines: dict[str, int]) -> int:
    """Record an object key's line; return the position after the key string."""
    stop = _string_end(text, pos)
    key = json.loads(text[pos:stop])  # decodes escapes exactly as the parser did
    pointer = f"{container.pointer}/{escape_pointer_token(key)}"
    lines[pointer] = line
    container.key_pointer = pointer
    container.expect_key = False
    return stop


def _scan_value(text: str, pos: int, line: int, stack: list[_Container], lines: dict[str, int]) -> int:
    """Record a value's line (array elements and the root; object values use their key's line)."""
    top = stack[-1] if stack else None
    if top is None:
        pointer = ""
        lines[pointer] = line
    elif top.is_object:
        pointer = top.key_pointer
    else:
        pointer = f"{top.pointer}/{top.index}"
        top.index += 1
        lines[pointer] = line
    ch = text[pos]
    if ch in "{[":
        stack.append(_Container(pointer=pointer, is_object=ch == "{"))
        return pos + 1
    if ch == '"':
        return _string_end(text, pos)
    match = _SCALAR.match(text, pos)
    return match.end() if match else pos + 1


def _string_end(text: str, pos: int) -> int:
    """Position just after the JSON string starting at ``pos`` (the text was already validated by json)."""
    match = _STRING.match(text, pos)
    return match.end() if match else pos + 1


def load_dtype(config: ConfigFile | None) -> str | None:
    """The dtype from_pretrained loads in by default: the config's `dtype` (`torch_dtype` before v5),
    as a safetensors code of a floating type."""

    if config is None:
        return None
    codes = {name: code for code, name in TORCH_DTYPE_NAMES.items() if code in ("F64", "F32", "F16", "BF16")}
    for key in ("dtype", "torch_dtype"):
        value = config.data.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in codes:
            return codes[value.removeprefix("torch.")]
    return None
