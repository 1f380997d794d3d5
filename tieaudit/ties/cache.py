"""A persistent cache of declared tie maps, so a repeat audit does not import transformers and torch.

Computing the declared ties of a checkpoint means importing transformers (~5 s) and building the model on the
meta device; the result depends only on the transformers version, the architecture and the config. Repeat audits
(CI on every push, the N checkpoints of one training run) share it: an entry is keyed by the transformers
version, tieaudit's version and the config (minus fields that cannot change the model: `_name_or_path`,
`transformers_version`), and stored as JSON under `$TIEAUDIT_CACHE_DIR`, else `$XDG_CACHE_HOME/tieaudit`, else
`~/.cache/tieaudit`. `TIEAUDIT_NO_CACHE=1` (or `check --no-cache`) turns it off.

The on-disk -> in-memory name mapping is stored for every parameter of the model, the reverse one for the members
of tied groups (the only names it is asked for); a name an entry does not know falls back to transformers itself,
computed on first use, so a cached entry never answers differently from a fresh computation. A cache that cannot
be read or written is ignored: it only ever costs time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tieaudit._version import __version__

FORMAT = 2  # 2: flags of configs nested more than one level deep point at their own key
_VOLATILE = ("_name_or_path", "transformers_version")


_off = [0]  # nesting depth of `disabled()`


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """No cache for the duration (`check --no-cache`), without touching the environment."""
    _off[0] += 1
    try:
        yield
    finally:
        _off[0] -= 1


def switched_on(variable: str) -> bool:
    """An on/off environment switch: set to anything but empty, `0` or `false`."""
    return os.environ.get(variable, "").strip() not in ("", "0", "false")


def cache_dir() -> Path | None:
    """Where entries live, or None when caching is off."""
    if _off[0] or switched_on("TIEAUDIT_NO_CACHE"):
        return None
    explicit = os.environ.get("TIEAUDIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "tieaudit"


def transformers_version() -> str | None:
    """The installed transformers version, read from its metadata (importing transformers is what we avoid)."""
    from importlib.metadata import (  # lazy: ~20 ms that start-up never needs
        PackageNotFoundError,
        version,
    )

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def entry_key(architecture: str | None, config_data: Mapping[str, Any], tf_version: str) -> str:
    relevant = {k: v for k, v in config_data.items() if k not in _VOLATILE}
    text = json.dumps(
        {
            "format": FORMAT,
            "tieaudit": __version__,
            "transformers": tf_version,
            "arch": architecture,
            "config": relevant,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def load(key: str) -> dict[str, Any] | None:
    """The stored entry, or None (absent, unreadable, or not in this format)."""
    root = cache_dir()
    if root is None:
        return None
    try:
        with open(root / f"{key}.json", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        return None
    return data


def store(key: str, entry: dict[str, Any]) -> None:
    """Write an entry atomically (a temporary file renamed into place); failures are ignored."""
    root = cache_dir()
    if root is None:
        return
    payload = {"format": FORMAT, "key": key, **entry}
    with contextlib.suppress(OSError, TypeError, ValueError):
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh)  # key order kept: the tie maps are ordered as transformers lists them
            os.replace(tmp, root / f"{key}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class NameTable:
    """A name mapping read from the cache; an unknown name asks `fallback()` (the real mapping, built once)."""

    def __init__(self, table: Mapping[str, str], fallback: Callable[[], Callable[[str], str]]) -> None:
        self.table = dict(table)
        self._fallback = fallback
        self._real: Callable[[str], str] | None = None

    def __call__(self, name: str) -> str:
        found = self.table.get(name)
        if found is not None:
            return found
        if self._real is None:
            self._real = self._fallback()
        return self._real(name)
