"""stderr output, colour decisions, progress and the error guard shared by every command."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer

from tieaudit.errors import TieauditError

F = TypeVar("F", bound=Callable[..., Any])


def use_color(mode: str, stream: Any) -> bool:
    """`--color auto|always|never`; auto means a TTY and no NO_COLOR."""
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def err(message: str) -> None:
    """One line on stderr."""
    typer.echo(message, err=True)


def guarded(fn: F) -> F:
    """Map tieaudit errors to their exit code and anything unexpected to 2, with a one-line message.
    typer.Exit passes through untouched (it is a RuntimeError: a bare `except Exception` would eat it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except TieauditError as exc:
            err(f"tieaudit: error: {exc.message}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err("tieaudit: interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # the contract: never a traceback, exit 2
            if os.environ.get("TIEAUDIT_DEBUG"):
                traceback.print_exc()
            detail = " ".join(str(exc).split())[:300]
            err(f"tieaudit: internal error: {type(exc).__name__}: {detail} (set TIEAUDIT_DEBUG=1 for a traceback)")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def progress_reporter(enabled: bool | None) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress callback drawing on stderr, only once a step has taken longer than a moment.
    `enabled` None means: only on a TTY and not in CI."""
    if enabled is None:
        enabled = sys.stderr.isatty() and not os.environ.get("CI")
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.status import Status

    console = Console(stderr=True)
    started = time.monotonic()
    status: Status | None = None

    def update(message: str, done: int, total: int) -> None:
        nonlocal status
        text = f"{message} ({done + 1}/{total})" if total else message
        if status is None and time.monotonic() - started > 0.3:
            status = console.status(text)
            status.start()
        elif status is not None:
            status.update(text)

    try:
        yield update
    finally:
        if status is not None:
            status.stop()
