"""Project configuration: `[tool.tieaudit]` in pyproject.toml, or a `tieaudit.toml`, as ruff reads its own.

The file is the nearest one from the current directory upward: in each directory a `tieaudit.toml` wins over a
`pyproject.toml`, and a `pyproject.toml` counts only when it has a `[tool.tieaudit]` table. `--config FILE` names
one explicitly; `--isolated` ignores every file. Keys (kebab-case, as in ruff):

    select = ["TIE0"]                 # rule codes, prefixes or names
    ignore = ["TIE006"]
    fail-on = "error"                 # error | warning | info
    format = "github"                 # text | json | sarif | github | markdown
    [tool.tieaudit.per-path-ignores]  # glob on the checkpoint path -> codes to ignore there
    "outputs/legacy-*" = ["TIE005"]

Precedence: command-line flags, then the environment (`TIEAUDIT_FORMAT`), then the file, then the defaults.
A file that is not valid TOML, an unknown key or a value of the wrong type is a one-line error naming the key
(exit 2). No torch import here.
"""

from __future__ import annotations

import fnmatch
import posixpath
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from tieaudit.errors import InputError
from tieaudit.report import FORMATS
from tieaudit.rules import unknown_selectors

SEVERITIES = ("error", "warning", "info")
KEYS = ("select", "ignore", "fail-on", "format", "per-path-ignores")


@dataclass(frozen=True)
class Config:
    """What a configuration file says (None / empty: not set there)."""

    path: Path | None = None
    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    fail_on: str | None = None
    format: str | None = None
    per_path_ignores: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def ignores_for(self, target: str) -> tuple[str, ...]:
        """The codes `per-path-ignores` ignores for a checkpoint path (matched as given and as an absolute path,
        relative patterns from the configuration file's directory)."""
        out: list[str] = []
        given = PurePath(target).as_posix().rstrip("/")
        absolute = Path(target).absolute().as_posix()
        root = self.path.parent.absolute().as_posix() if self.path else None
        for pattern, codes in self.per_path_ignores.items():
            pat = pattern.rstrip("/")
            candidates = [pat] + ([posixpath.join(root, pat)] if root and not pat.startswith("/") else [])
            if any(fnmatch.fnmatchcase(given, p) or fnmatch.fnmatchcase(absolute, p) for p in candidates):
                out.extend(codes)
        return tuple(out)


def find_config(start: Path | None = None) -> Path | None:
    """The nearest `tieaudit.toml`, or `pyproject.toml` with a `[tool.tieaudit]` table, from `start` upward."""
    here = (start or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        own = directory / "tieaudit.toml"
        if own.is_file():
            return own
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and _has_table(pyproject):
            return pyproject
    return None


def load_config(path: Path | None = None, *, isolated: bool = False) -> Config:
    """The configuration in effect: `path` (--config) when given, else the nearest file; nothing when isolated."""
    if isolated:
        return Config()
    if path is None:
        path = find_config()
        if path is None:
            return Config()
    elif not Path(path).is_file():
        raise InputError(f"--config {path}: no such file")
    return parse_config(Path(path))


def parse_config(path: Path) -> Config:
    data = _read_toml(path)
    table: Any = data
    where = path.name
    if path.name == "pyproject.toml" or "tool" in data:
        table = data.get("tool", {}).get("tieaudit", {})
        where = f"{path.name} [tool.tieaudit]"
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")

    def codes(key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise InputError(f"{where}: {key} must be a list of rule codes, prefixes or names, got {value!r}")
        return tuple(v.strip() for v in value)

    def choice(key: str, choices: tuple[str, ...]) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or value.lower() not in choices:
            raise InputError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    per_path = table.get("per-path-ignores", {})
    if not isinstance(per_path, dict):
        raise InputError(f"{where}: per-path-ignores must be a table of glob = [codes], got {per_path!r}")
    config = Config(
        path=path,
        select=codes("select", table["select"]) if "select" in table else None,
        ignore=codes("ignore", table["ignore"]) if "ignore" in table else (),
        fail_on=choice("fail-on", SEVERITIES),
        format=choice("format", FORMATS),
        per_path_ignores={str(k): codes(f"per-path-ignores.{k!r}", v) for k, v in per_path.items()},
    )
    _check_selectors(config, where)
    return config


def _check_selectors(config: Config, where: str) -> None:

    for key, values in (
        ("select", config.select or ()),
        ("ignore", config.ignore),
        *((f"per-path-ignores.{k!r}", v) for k, v in config.per_path_ignores.items()),
    ):
        bad = unknown_selectors(list(values))
        if bad:
            raise InputError(f"{where}: {key}: unknown rule selector {bad[0]!r} (see `tieaudit rules`)")


def _has_table(pyproject: Path) -> bool:
    try:
        data = _read_toml(pyproject)
    except InputError:
        return True  # a broken pyproject.toml that may hold our table: parse_config reports it
    tool = data.get("tool")
    return isinstance(tool, dict) and "tieaudit" in tool


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib  # lazy: tomllib on Python 3.11+, tomli before
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # lazy: tomllib on Python 3.11+, tomli before
    try:
        with open(path, "rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML: {exc}") from None
    return data
