"""The test and demo environment: torch from the right index, the lock, and what changed since it was written.

Used by the Makefile; runs with the interpreter of the venv it works on, standard library only:

    python tools/envlock.py install-torch SPEC [INDEX_URL]   # CPU build where INDEX_URL answers, else the default index
    python tools/envlock.py freeze LOCK                      # write LOCK from this environment (`make lock`)
    python tools/envlock.py diff LOCK                        # what this environment has that LOCK does not say
    python tools/envlock.py check LOCK [SKIP]                # exit 1 if an installed version differs from LOCK
    python tools/envlock.py without NAME LOCK OUT            # LOCK minus NAME's line (torch is installed on its own)
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

PROBE_TIMEOUT = 5.0  # seconds: an index that does not answer by then is treated as unreachable
HEADER = """\
# The versions the test suite and `make demo` were verified with (pip constraints; Python 3.11, Linux x86-64).
# pyproject.toml keeps the library's ranges for users; `make demo`, `make test` and CI install exactly these.
# Regenerate deliberately with `make lock`: it installs the newest versions pyproject allows into .venv-latest,
# runs the whole suite there, and writes this file only if the suite passes. Commit it with the suite re-run.
# torch is pinned without a local label (+cpu): the Makefile installs it from TORCH_INDEX_URL first.
"""
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(lines: list[str]) -> dict[str, str]:
    """`name==version` lines (comments and blanks skipped) -> {canonical name: version}."""
    out = {}
    for line in lines:
        m = _NAME.match(line.split("#", 1)[0].strip())
        if m:
            out[canonical(m.group(1))] = m.group(2)
    return out


def public(version: str) -> str:
    """`2.13.0+cpu` -> `2.13.0`: a constraint without a local label matches every build of that release."""
    return version.split("+", 1)[0]


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Does the package index at `url` answer (any HTTP status below 500)?"""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as resp:
            return int(resp.status) < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def installed_torch() -> str | None:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return None


def satisfied(spec: str, installed: str | None) -> bool:
    """Is `installed` what `spec` asks for? Only `torch` and `torch==V` are understood; anything else reinstalls."""
    if installed is None:
        return False
    if canonical(spec.strip()) == "torch":
        return True
    m = re.fullmatch(r"\s*torch\s*==\s*(\S+)\s*", spec)
    return bool(m) and public(installed) == public(m.group(1))


def pip(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", *args])


def install_torch(spec: str, index_url: str) -> int:
    if satisfied(spec, installed_torch()):
        return 0
    if index_url and reachable(index_url):
        return pip("--no-deps", "--index-url", index_url, spec)
    if index_url:
        print(
            f"setup: {index_url} is unreachable; installing {spec} from the default index "
            "(on Linux x86-64 that is the CUDA build, several GB; set TORCH_INDEX_URL or TORCH_SPEC to choose)",
            file=sys.stderr,
        )
    return pip("--no-deps", spec)


def freeze() -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {name: public(v) for name, v in parse(out.splitlines()).items()}


def write_lock(lock: Path) -> int:
    pins = freeze()
    body = "".join(f"{name}=={v}\n" for name, v in sorted(pins.items()))
    lock.write_text(HEADER + body, encoding="utf-8")
    print(f"wrote {lock}: {len(pins)} pinned packages")
    return 0


def diff(lock: Path) -> int:
    locked = parse(lock.read_text(encoding="utf-8").splitlines())
    now = freeze()
    rows = []
    for name in sorted(set(locked) | set(now)):
        a, b = locked.get(name), now.get(name)
        if a != b:
            rows.append(f"  {name}: {a or '-'} -> {b or '-'}")
    print(f"versions that differ from {lock} ({len(rows)}):" if rows else f"every version as in {lock}")
    for row in rows:
        print(row)
    return 0


def check(lock: Path, skip: str = "") -> int:
    """After an install under the lock: every installed package the lock names has the locked version (SKIP, e.g.
    torch whose spec may be overridden, aside)."""
    locked = parse(lock.read_text(encoding="utf-8").splitlines())
    now = freeze()
    wrong = [f"{n} {now[n]} (locked {v})" for n, v in sorted(locked.items()) if n in now and n != skip and now[n] != v]
    if wrong:
        print(f"setup: installed versions differ from {lock}: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


def without(name: str, lock: Path, out: Path) -> int:
    keep = [line for line in lock.read_text(encoding="utf-8").splitlines() if canonical(line.split("==")[0]) != name]
    out.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str]) -> int:
    match argv:
        case ["install-torch", spec]:
            return install_torch(spec, "")
        case ["install-torch", spec, index_url]:
            return install_torch(spec, index_url)
        case ["freeze", lock]:
            return write_lock(Path(lock))
        case ["diff", lock]:
            return diff(Path(lock))
        case ["check", lock]:
            return check(Path(lock))
        case ["check", lock, skip]:
            return check(Path(lock), canonical(skip))
        case ["without", name, lock, out]:
            return without(canonical(name), Path(lock), Path(out))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
