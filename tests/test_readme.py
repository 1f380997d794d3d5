"""The README's and docs/'s console examples are real: every `$ tieaudit ...` command whose inputs are in this
repository (the committed demo checkpoints) is run as written, and every line shown under it must appear in the
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
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TIMING = re.compile(r"\d+(\.\d+)? s\)")


def examples(page: Path = README) -> list[tuple[int, str, list[str]]]:
    """(line number, command, the output lines shown under it) for each `$ tieaudit` line of a console block."""
    out: list[tuple[int, str, list[str]]] = []
    lines = page.read_text().splitlines()
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


REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def runnable(command: str) -> bool:
    """Its inputs are committed demo checkpoints (outputs under /tmp), or Hub repo ids, which the test's empty
    Hugging Face cache does not hold."""
    args = shlex.split(command)[1:]
    inputs = [a for a in args if not a.startswith("-") and ("/" in a or a.startswith("."))]
    if inputs and all(REPO_ID.fullmatch(a) and not (ROOT / a).exists() for a in inputs):
        return True
    return all((ROOT / a).exists() or a.startswith("/tmp/") for a in inputs) and any(
        a.startswith("fixtures/") for a in inputs
    )


CASES = [(page.relative_to(ROOT).as_posix(), *e) for page in PAGES for e in examples(page) if runnable(e[1])]


def test_the_readme_has_runnable_examples() -> None:
    assert sum(1 for c in CASES if c[0] == "README.md") >= 2, [c[2] for c in CASES]
    assert len(CASES) >= 5, [c[2] for c in CASES]


def test_every_tieaudit_example_is_runnable() -> None:
    """A `$ tieaudit` example whose inputs are not in this repository cannot be checked, so none may be shown."""
    unchecked = [
        f"{page.relative_to(ROOT)}:{line}: {command}"
        for page in PAGES
        for line, command, _ in examples(page)
        if not runnable(command)
    ]
    assert not unchecked, unchecked


@pytest.mark.parametrize(("page", "line", "command", "shown"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_readme_example(page: str, line: int, command: str, shown: list[str], tmp_path: Path) -> None:
    argv = shlex.split(command)
    redirected = {a: str(tmp_path / Path(a).name) for a in argv if a.startswith("/tmp/")}
    argv = [redirected.get(a, a) for a in argv]
    hub = tmp_path / "hub"  # an empty Hugging Face cache: a repo id in an example is never there
    hub.mkdir()
    exe = Path(sys.executable).parent / "tieaudit"
    proc = subprocess.run(
        [str(exe), *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "TIEAUDIT_FORMAT": "", "COLUMNS": "200", "HF_HUB_CACHE": str(hub)},
        timeout=300,
    )
    actual = (proc.stdout + proc.stderr).splitlines()
    for old, new in [*redirected.items(), ("<HF_HUB_CACHE>", str(hub))]:
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
                f"{page}:{line}: `{command}` does not print:\n{expected}\n--- it printed:\n" + "\n".join(actual)
            )


@pytest.mark.parametrize("page", ["README.md", "docs/rules.md"])
def test_rule_tables_list_every_rule(page: str) -> None:
    """The rule tables are the contract users read: every registered rule, with its code and name, and no other."""
    from tieaudit.rules import all_rules

    rows = re.findall(r"^\| (TIE\d+) \| ([a-z0-9-]+) \|", (ROOT / page).read_text(), re.M)
    assert rows == [(r.code, r.name) for r in all_rules()]
