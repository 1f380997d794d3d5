"""The zoo sweep: every model class of the installed transformers' auto mappings that declares tied weights, built
tiny from its own default config (tools/zoo.py), saved clean and broken, with the truth taken from a real
``from_pretrained`` (and ``tie_weights()``) of each save; tieaudit must catch every broken save and raise no
warning or error on a save that loads as saved.

Variants per class (tools/zoo.py ``VARIANTS``): ``clean`` (the default config), ``tied_clean`` (every flag set true,
for classes that tie nothing by default), ``untied_clean`` (separate equal copies under an untied flag),
``untied_missing`` (the flag turned off over shared weights: save_pretrained drops the head) and ``diverged``
(a perturbed head under a tied flag).

Built models are reused across runs while transformers, torch and tools/zoo.py are unchanged
(``$TIEAUDIT_ZOO_DIR``, else ``~/.cache/tieaudit-zoo``; a new build replaces any other there); a fresh machine
builds them (about 5 minutes on 2 cores).
Deselect with ``-m "not zoo"`` while iterating; CI runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCKED_TRANSFORMERS = next(
    line.split("==", 1)[1].strip()
    for line in (ROOT / "constraints.txt").read_text().splitlines()
    if line.lower().startswith("transformers==")
)
MIN_CLASSES = 300

pytestmark = pytest.mark.zoo


def _load_zoo() -> Any:
    spec = importlib.util.spec_from_file_location("tieaudit_zoo", ROOT / "tools" / "zoo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()


def _zoo_dir() -> Path:
    return Path(zoo.default_dir())


@pytest.fixture(scope="module")
def built() -> tuple[Path, dict[str, Any], list[str]]:
    """The zoo for this environment: reused when complete, else built (into a temporary sibling, then renamed)."""
    out = _zoo_dir()
    summary = out / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        return out, data["results"], data["classes"]
    for stale in out.parent.glob("transformers-*"):  # other versions' zoos and interrupted builds: gigabytes
        shutil.rmtree(stale, ignore_errors=True)
    partial = out.parent / f"{out.name}.partial-{os.getpid()}"
    classes = zoo.tied_classes()
    results = zoo.sweep(classes, partial, jobs=2)
    (partial / "summary.json").write_text(json.dumps({"classes": classes, "results": results}, sort_keys=True))
    os.replace(partial, out)
    return out, results, classes


def _stable(report: dict[str, Any]) -> dict[str, Any]:
    """A target's report without what may differ between two runs (timings, bytes read, the skipped reasons)."""
    return {k: v for k, v in report.items() if k not in ("stats", "skipped", "summary")} | {
        "findings": report.get("findings"),
        "exit_code": report.get("summary", {}).get("exit_code"),
    }


def test_every_tied_architecture(built: tuple[Path, dict[str, Any], list[str]], tmp_path: Path) -> None:
    out, results, classes = built
    directories = sorted(
        out / cls / variant
        for cls, record in results.items()
        for variant, entry in record.get("variants", {}).items()
        if entry.get("status") == "built"
    )
    env = {**os.environ, "TIEAUDIT_CACHE_DIR": str(tmp_path / "cache")}  # cold: no tie map from an earlier run
    batch = zoo.audit_all(directories, env=env)  # the shipped tie table answers where it can vouch for the config
    computed = zoo.audit_all(directories, env={**os.environ, "TIEAUDIT_NO_CACHE": "1"})  # transformers answers
    assert batch["errors"] == computed["errors"]
    differ = [
        s["target"]["path"]
        for s, c in zip(batch["reports"], computed["reports"], strict=True)
        if _stable(s) != _stable(c)
    ]
    assert not differ, f"the shipped table and transformers disagree on {len(differ)} checkpoints: {differ[:5]}"
    judged = zoo.judge(results, out, batch)
    report = [*zoo.summary_lines(results), *zoo.verdict_lines(judged)]
    print("\n".join(["", f"zoo sweep ({out}):", *report]))

    statuses = [r["status"] for r in results.values()]
    built_classes = statuses.count("built") - len(judged["set_aside"])
    outcomes = [row["outcome"] for row in judged["rows"]]
    broken = [row for row in judged["rows"] if row["truth"] != "intact"]
    assert len(classes) == len(results)
    assert statuses.count("failed") == 0, [c for c, r in results.items() if r["status"] == "failed"]
    assert broken, "no broken checkpoint was built: the sweep measures nothing"
    assert outcomes.count("miss") == 0, [r for r in judged["rows"] if r["outcome"] == "miss"]
    assert outcomes.count("false-alarm") == 0, [r for r in judged["rows"] if r["outcome"] == "false-alarm"]
    assert outcomes.count("not-audited") == 0, [r for r in judged["rows"] if r["outcome"] == "not-audited"]
    if version("transformers") == LOCKED_TRANSFORMERS:  # the coverage the README states
        assert built_classes >= MIN_CLASSES, report
