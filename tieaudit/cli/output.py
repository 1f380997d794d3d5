"""Writing a rendered report: stdout, or a file opened only after the audit."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from tieaudit.errors import UsageError, WriteError

FORMATS = ("text", "json")
COLOR_MODES = ("auto", "always", "never")


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UsageError(f"invalid value for {option}: {value!r} (choose from {', '.join(choices)})")
    return value


def emit(document: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(document)
        sys.stdout.flush()
        return
    tmp = output.with_name(f".{output.name}.tieaudit-tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(document)
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write the report to {output}: {exc.strerror or exc}") from None
