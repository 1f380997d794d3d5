"""The locked test environment (constraints.txt, tools/envlock.py, the Makefile): the lock pins everything the
project needs within pyproject's ranges, the torch install prefers the CPU index and falls back quickly, with one
line, where it does not answer."""

from __future__ import annotations

import http.server
import importlib.util
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
_spec = importlib.util.spec_from_file_location("envlock", ROOT / "tools" / "envlock.py")
assert _spec and _spec.loader
envlock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(envlock)


def locked() -> dict[str, str]:
    return envlock.parse(LOCK.read_text().splitlines())


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [Requirement(r) for r in reqs]


def test_lock_pins_every_requirement_within_pyproject_ranges() -> None:
    pins = locked()
    env = {"python_version": "3.11", "extra": "test"}
    for req in requirements():
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # e.g. tomli, for Python < 3.11 only
        name = envlock.canonical(req.name)
        assert name in pins, f"{name} is not locked"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"


def test_lock_is_exact_and_has_no_local_labels() -> None:
    lines = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert lines == sorted(lines, key=lambda x: x.split("==")[0]) and len(lines) == len(locked())
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), lines
    assert {"torch", "transformers", "peft", "safetensors", "huggingface-hub", "accelerate", "numpy", "typer"} <= set(
        locked()
    )


def test_parse_public_and_satisfied() -> None:
    assert envlock.parse(["# c", "Foo_Bar==1.0  # x", "", "torch==2.13.0"]) == {"foo-bar": "1.0", "torch": "2.13.0"}
    assert envlock.public("2.13.0+cpu") == "2.13.0"
    assert envlock.satisfied("torch==2.13.0", "2.13.0+cpu")
    assert not envlock.satisfied("torch==2.12.0", "2.13.0+cpu")
    assert envlock.satisfied("torch", "2.1.0") and not envlock.satisfied("torch", None)
    assert not envlock.satisfied("torch>=2.4", "2.13.0")  # not understood: reinstall rather than guess


@pytest.fixture
def index() -> Iterator[str]:
    """A local package index answering /torch/."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/simple/torch/" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def test_reachable(index: str) -> None:
    assert envlock.reachable(index)
    started = time.monotonic()
    assert not envlock.reachable("http://127.0.0.1:9/simple")  # closed port: refused at once
    assert not envlock.reachable("not a url")
    assert time.monotonic() - started < envlock.PROBE_TIMEOUT


def test_install_torch_prefers_the_index_and_falls_back_with_one_line(
    index: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(envlock, "pip", lambda *args: calls.append(args) or 0)
    monkeypatch.setattr(envlock, "installed_torch", lambda: None)
    assert envlock.install_torch("torch==2.13.0", index) == 0
    assert calls[-1] == ("--no-deps", "--index-url", index, "torch==2.13.0")
    assert capsys.readouterr().err == ""
    assert envlock.install_torch("torch==2.13.0", "http://127.0.0.1:9/simple") == 0
    assert calls[-1] == ("--no-deps", "torch==2.13.0")
    [line] = capsys.readouterr().err.splitlines()
    assert "unreachable" in line and "CUDA" in line and "TORCH_INDEX_URL" in line
    assert envlock.install_torch("torch==2.13.0", "") == 0  # TORCH_INDEX_URL= : the default index, silently
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(envlock, "installed_torch", lambda: "2.13.0+cpu")
    calls.clear()
    assert envlock.install_torch("torch==2.13.0", index) == 0 and calls == []  # already there: nothing to do


def test_check_names_what_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("a==1\nb==2\ntorch==2.13.0\nnot-installed==3\n")
    monkeypatch.setattr(envlock, "freeze", lambda: {"a": "1", "b": "2.1", "torch": "2.12.0"})
    assert envlock.check(lock, "torch") == 1
    assert capsys.readouterr().err.strip() == f"setup: installed versions differ from {lock}: b 2.1 (locked 2)"
    monkeypatch.setattr(envlock, "freeze", lambda: {"a": "1", "b": "2", "torch": "2.12.0"})
    assert envlock.check(lock, "torch") == 0


def test_without_drops_one_package(tmp_path: Path) -> None:
    out = tmp_path / "c.txt"
    envlock.without("torch", LOCK, out)
    assert "torch" not in envlock.parse(out.read_text().splitlines())
    assert envlock.parse(out.read_text().splitlines()) == {k: v for k, v in locked().items() if k != "torch"}
