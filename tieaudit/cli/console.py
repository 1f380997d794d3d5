"""stderr output, colour decisions, progress and the error guard shared by every command."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
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


def progress_wanted(enabled: bool | None, machine_format: bool = False) -> bool:
    """`--progress/--no-progress`, else on only when stderr is a terminal, outside CI, and the report is for a human
    (text): a machine format's consumer is a program, and CI logs keep every redraw."""
    if enabled is not None:
        return enabled
    return sys.stderr.isatty() and not os.environ.get("CI") and not machine_format


@contextlib.contextmanager
def progress_reporter(
    enabled: bool | None, machine_format: bool = False, delay: float = 0.3
) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress callback `(message, done, total)` drawing a rich progress bar on stderr (a pulsing one while the
    total is unknown). The bar appears once the command has run for `delay` seconds, even in the middle of one long
    step (a timer starts it, not the next callback), and is erased at the end. It never touches stdout."""
    if not progress_wanted(enabled, machine_format):
        yield None
        return

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    # done/total are bytes read or written: shown as "312.0/514.0 MB" and a rate; a step of unknown size pulses
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        redirect_stdout=False,  # the report goes to stdout, whatever is drawing on stderr
        redirect_stderr=False,
    )
    task = bar.add_task("working", total=None)
    lock = threading.Lock()
    state = {"shown": False, "done": False}

    def show() -> None:
        with lock:
            if not state["done"]:
                bar.start()
                state["shown"] = True

    timer = threading.Timer(delay, show)
    timer.daemon = True
    timer.start()

    def update(message: str, done: int, total: int) -> None:
        bar.update(task, description=message, total=total or None, completed=done if total else 0)

    try:
        yield update
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
            if state["shown"]:
                bar.stop()
