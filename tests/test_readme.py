"""The README's console examples are real: every `$ tieaudit ...` command whose inputs are in this repository
(the committed demo checkpoints) is run as written, and every line the README shows under it must appear in the
real output, in order (the README may leave lines out, marked "..." or not, never make them up). Output
directories under /tmp are redirected to a temporary directory; timings are compared as "N s"."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMING = re.compile(r"\d+(\.\d+)? s\)")


def examples() -> list[tuple[int, str, list[str]]]:
    """(line number, command, the output lines shown under it) for each `$ tieaudit` line of a console block."""
    out: list[tuple[int, str, list[str]]] = []
    lines = README.read_text().splitlines()
    in_block, indent = False, 0
    current: tuple[int, str, list[str]] | None = None
    for number, line in enumerate(lines, 1):
        stripped = line.lstrip(" ")
        if stripped.startswith("```"):
            if not in_block and stripped.startswith("```console"):
                in_block, indent = True, len(line) - len(stripped)
            elif in_block:
                in_block = False
                if current:
                    out.append(current)
                current = None
            continue
        if not in_block:
            continue
        text = line[indent:] if line[:indent].strip() == "" else line
        if text.startswith("$ "):
            if current:
                out.append(current)
            current = (number, text[2:], []) if text.startswith("$ tieaudit ") else None
        elif current is not None:
            current[2].append(text)
    return out


def runnable(command: str) -> bool:
    args = shlex.split(command)[1:]
    inputs = [a for a in args if not a.startswith("-") and ("/" in a or a.startswith("."))]
    return all((ROOT / a).exists() or a.startswith("/tmp/") for a in inputs) and any(
        a.startswith("fixtures/") for a in inputs
    )


CASES = [e for e in examples() if runnable(e[1])]


def test_the_readme_has_runnable_examples() -> None:
    assert len(CASES) >= 5, [c[1] for c in CASES]


@pytest.mark.parametrize(("line", "command", "shown"), CASES, ids=[f"README.md:{c[0]}" for c in CASES])
def test_readme_example(line: int, command: str, shown: list[str], tmp_path: Path) -> None:
    argv = shlex.split(command)
    redirected = {a: str(tmp_path / Path(a).name) for a in argv if a.startswith("/tmp/")}
    argv = [redirected.get(a, a) for a in argv]
    exe = Path(sys.executable).parent / "tieaudit"
    proc = subprocess.run(
        [str(exe), *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "TIEAUDIT_FORMAT": "", "COLUMNS": "200"},
        timeout=300,
    )
    actual = (proc.stdout + proc.stderr).splitlines()
    for old, new in redirected.items():
        shown = [s.replace(old, new) for s in shown]
    position = 0
    for expected in (s for s in shown if s.strip() not in ("", "...")):  # "..." marks lines left out
        want = TIMING.sub("N s)", expected.rstrip())
        for i in range(position, len(actual)):
            if TIMING.sub("N s)", actual[i].rstrip()) == want:
                position = i + 1
                break
        else:
            raise AssertionError(
                f"README.md:{line}: `{command}` does not print:\n{expected}\n--- it printed:\n" + "\n".join(actual)
            )
