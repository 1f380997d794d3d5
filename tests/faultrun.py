"""Run the tieaudit CLI with a fault injected at one point of a write: ``python tests/faultrun.py SPEC ARGS...``.

SPEC is ``POINT`` (the process kills itself with SIGKILL there) or ``POINT:pause:GATE`` (it creates
``GATE.ready`` and waits, at most 120 s, until ``GATE`` is removed, so a test can act while a write is in
progress). Points are those of :func:`tieaudit.repair.staging.step`. The hook lives here, in the tests, not in
the package: tieaudit only announces the points.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def observer(spec: str):  # type: ignore[no-untyped-def]
    def at(point: str) -> None:
        if spec == point:
            os.kill(os.getpid(), signal.SIGKILL)
        if spec.startswith(f"{point}:pause:"):
            gate = Path(spec.split(":", 2)[2])
            Path(f"{gate}.ready").touch()
            deadline = time.monotonic() + 120
            while gate.exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    return at


def main() -> None:
    from tieaudit.cli.app import main as cli
    from tieaudit.repair.staging import observe_steps

    spec = sys.argv.pop(1)
    with observe_steps(observer(spec)):
        cli()  # exits


if __name__ == "__main__":
    main()
