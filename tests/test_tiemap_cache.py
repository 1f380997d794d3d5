"""The persistent tie-map cache: a repeat audit answers exactly as a fresh one, without importing transformers or
torch when the verdict needs no tensor data; a broken cache only costs time; TIEAUDIT_NO_CACHE turns it off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.builders import ARCHS
from tieaudit import audit
from tieaudit.report.json_format import report_dict
from tieaudit.ties import cache as tiemap_cache
from tieaudit.ties import declared

DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "demo"


def _fresh_dict(path: Path) -> dict:
    return report_dict(audit(path))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TIEAUDIT_CACHE_DIR", str(root))
    monkeypatch.delenv("TIEAUDIT_NO_CACHE", raising=False)
    monkeypatch.setenv("TIEAUDIT_NO_TABLE", "1")  # the shipped table would answer first: this is the cache's test
    monkeypatch.setattr(declared, "_cache", {})  # the in-memory layer would hide the disk one
    return root


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("variant", ["clean", "untied_missing"])
def test_cached_audit_equals_a_fresh_one(cache: Path, checkpoint, arch: str, variant: str, monkeypatch) -> None:
    path = checkpoint(arch, variant, "safetensors")
    monkeypatch.setenv("TIEAUDIT_NO_CACHE", "1")
    fresh = _fresh_dict(path)
    assert not cache.exists()  # off means off: nothing written
    monkeypatch.delenv("TIEAUDIT_NO_CACHE")
    declared._cache.clear()
    first = _fresh_dict(path)  # computes and stores
    assert len(list(cache.glob("*.json"))) == 1
    declared._cache.clear()
    second = _fresh_dict(path)  # from the disk entry
    assert first == fresh and second == fresh


def test_hit_imports_neither_torch_nor_transformers(cache: Path) -> None:
    script = (
        "import sys; from tieaudit import audit\n"
        f"r = audit({str(DEMO / 'llama-untied-missing-head')!r})\n"
        "print(','.join(f.code for f in r.findings), 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    env = {**os.environ, "TIEAUDIT_CACHE_DIR": str(cache)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True) for _ in "12"]
    assert runs[0].stdout.split() == ["TIE002", "True", "True"]  # miss: transformers builds the meta model
    assert runs[1].stdout.split() == ["TIE002", "False", "False"]  # hit: headers and the cached map only


def test_unavailable_tie_map_is_cached_too(cache: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "odd"
    ckpt.mkdir()
    for f in (DEMO / "llama-clean").iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    first = audit(ckpt)
    declared._cache.clear()
    second = audit(ckpt)
    assert [s.reason for s in first.skipped] == [s.reason for s in second.skipped]
    assert "NoSuchForCausalLM is not a class of transformers" in first.skipped[0].reason


def test_corrupt_or_foreign_entries_are_recomputed(cache: Path) -> None:
    path = DEMO / "llama-untied-missing-head"
    fresh = _fresh_dict(path)
    (entry,) = cache.glob("*.json")
    for bad in ("{not json", json.dumps({"format": 99}), json.dumps({"format": 1, "key": entry.stem, "flags": 3})):
        entry.write_text(bad)
        declared._cache.clear()
        assert _fresh_dict(path) == fresh
    assert json.loads(entry.read_text())["format"] == tiemap_cache.FORMAT  # rewritten whole


def test_unwritable_cache_is_ignored(cache: Path) -> None:
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("a file where the directory should be")
    assert _fresh_dict(DEMO / "llama-clean")["findings"] == []


def test_unknown_names_fall_back_to_transformers() -> None:
    calls: list[str] = []

    def real() -> object:
        calls.append("built")
        return lambda name: name.replace("gamma", "weight")

    table = tiemap_cache.NameTable({"a.weight": "a.weight"}, real)  # type: ignore[arg-type]
    assert table("a.weight") == "a.weight" and not calls
    assert table("b.gamma") == "b.weight" and table("c.gamma") == "c.weight"
    assert calls == ["built"]  # built once, on the first unknown name


def test_key_ignores_volatile_fields_only() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "_name_or_path": "a", "transformers_version": "1"}
    same = {**base, "_name_or_path": "b", "transformers_version": "2"}
    other = {**base, "vocab_size": 65}
    k = tiemap_cache.entry_key("LlamaForCausalLM", base, "5.0")
    assert k == tiemap_cache.entry_key("LlamaForCausalLM", same, "5.0")
    assert k != tiemap_cache.entry_key("LlamaForCausalLM", other, "5.0")
    assert k != tiemap_cache.entry_key("LlamaForCausalLM", base, "5.1")  # another transformers, another entry


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TIEAUDIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("TIEAUDIT_NO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tiemap_cache.cache_dir() == tmp_path / "tieaudit"
    monkeypatch.setenv("TIEAUDIT_NO_CACHE", "1")
    assert tiemap_cache.cache_dir() is None


def test_no_cache_flag(cache: Path) -> None:
    from typer.testing import CliRunner

    from tieaudit.cli.app import app

    result = CliRunner().invoke(app, ["check", str(DEMO / "llama-clean"), "--no-cache", "--no-progress"])
    assert result.exit_code == 0 and not cache.exists()
    assert "TIEAUDIT_NO_CACHE" not in os.environ  # restored after the command
    declared._cache.clear()
    CliRunner().invoke(app, ["check", str(DEMO / "llama-clean"), "--no-progress"])
    assert len(list(cache.glob("*.json"))) == 1
