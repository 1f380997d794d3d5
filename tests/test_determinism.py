"""A report is a function of its input: the same checkpoint gives the same JSON document, byte for byte, run after
run (a cold tie-map cache, then a warm one), unless the user asks for timings with --timings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tieaudit.cli.app import app

runner = CliRunner()
DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "demo"


def run(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIEAUDIT_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "tieaudit", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def twice(args: list[str], tmp_path: Path, between: Callable[[], None] = lambda: None) -> tuple[str, str]:
    """stdout of two runs in fresh processes, the first on an empty tie-map cache."""
    cache = tmp_path / "cache"
    first = run(args, cache)
    assert first.returncode in (0, 1), first.stderr
    between()
    second = run(args, cache)
    assert second.returncode == first.returncode, second.stderr
    return first.stdout, second.stdout


def seconds(doc: dict) -> list[object]:
    out = [doc["stats"]["seconds"]]
    out += [doc[k]["seconds"] for k in ("fix_run", "merge_run") if doc.get(k)]
    return out


@pytest.mark.parametrize("name", ["llama-untied-missing-head", "llama-lora-tied"])
def test_check_json_is_byte_identical(name: str, tmp_path: Path) -> None:
    a, b = twice(["check", str(DEMO / name), "-f", "json"], tmp_path)
    assert a == b
    assert seconds(json.loads(a)) == [None]


def test_check_json_with_tensor_reads_and_probes_is_byte_identical(checkpoint, tmp_path: Path) -> None:
    path = checkpoint("llama", "diverged", "safetensors")
    a, b = twice(["check", str(path), "-f", "json"], tmp_path)
    doc = json.loads(a)
    assert a == b and doc["stats"]["tensor_bytes_read"] > 0 and doc["comparisons"]


def test_batch_formats_are_byte_identical(tmp_path: Path) -> None:
    paths = [str(DEMO / "llama-clean"), str(DEMO / "llama-untied-missing-head")]
    a, b = twice(["check", *paths, "-f", "json"], tmp_path)
    assert a == b
    for fmt in ("sarif", "markdown", "github"):  # the renderers on a warm cache, in-process
        first, second = (runner.invoke(app, ["check", *paths, "-f", fmt]).stdout for _ in range(2))
        assert first == second, fmt


def test_fix_and_merge_json_are_byte_identical(tmp_path: Path) -> None:
    a, b = twice(["fix", str(DEMO / "llama-untied-missing-head"), "--untie", "--dry-run", "-f", "json"], tmp_path)
    assert a == b and json.loads(a)["fix_run"]["seconds"] is None
    out = tmp_path / "merged"
    a, b = twice(
        ["merge", str(DEMO / "llama-lora-tied"), "--output-dir", str(out), "-f", "json"],
        tmp_path / "m",
        between=lambda: shutil.rmtree(out),
    )
    assert a == b and seconds(json.loads(a)) == [None, None]


def test_timings_are_reported_when_asked(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(DEMO / "llama-clean"), "-f", "json", "--timings"])
    [value] = seconds(json.loads(result.stdout))
    assert isinstance(value, float) and value > 0
    args = ["merge", str(DEMO / "llama-lora-tied"), "--output-dir", str(tmp_path / "merged"), "-f", "json"]
    merged = runner.invoke(app, [*args, "--timings"])
    assert all(isinstance(v, float) and v > 0 for v in seconds(json.loads(merged.stdout)))
