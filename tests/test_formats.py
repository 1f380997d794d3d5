"""Report formats for CI: SARIF (validated against the official 2.1.0 schema, shipped in tests/data), GitHub
workflow commands, markdown with a Mermaid tie graph, and `tieaudit graph` as Mermaid and dot. For every format,
stdout holds the document and nothing else, and the exit code is the JSON report's `summary.exit_code`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from tieaudit.cli.app import app

runner = CliRunner()
DATA = Path(__file__).resolve().parent / "data"
DEMO = "fixtures/demo"
TARGETS = {
    "broken": [f"{DEMO}/llama-untied-missing-head"],
    "clean": [f"{DEMO}/llama-clean"],
    "adapter": [f"{DEMO}/llama-lora-tied"],
}
GITHUB_LINE = re.compile(r"^::(error|warning|notice) file=[^,:]+,line=[1-9]\d*,title=tieaudit \(TIE\d{3}\)::\S.*$")


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, ["check", *args, "-f", "json"])
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def sarif_schema() -> dict:
    return json.loads((DATA / "sarif-schema-2.1.0.json").read_text())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_sarif_is_valid_and_matches_the_report(target: str, sarif_schema: dict) -> None:
    args = TARGETS[target]
    report = _json(args)
    result = runner.invoke(app, ["check", *args, "-f", "sarif"])
    assert result.exit_code == report["summary"]["exit_code"]
    doc = json.loads(result.stdout)  # stdout is one document
    jsonschema.Draft4Validator(sarif_schema).validate(doc)
    [run] = doc["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == sorted(r["id"] for r in rules) and len(rules) >= 10  # the whole registry
    assert all(r["help"]["text"] and r["defaultConfiguration"]["level"] in ("error", "warning", "note") for r in rules)
    assert len(run["results"]) == len(report["findings"])
    for res, f in zip(run["results"], report["findings"], strict=True):
        assert res["ruleId"] == f["code"] and rules[res["ruleIndex"]]["id"] == f["code"]
        assert res["partialFingerprints"]["tieauditFingerprint/v1"] == f["fingerprint"]
        loc = res["locations"][0]
        region = loc["physicalLocation"]["region"]
        assert region["startLine"] == (f["location"]["line"] or 1) >= 1
        assert loc["physicalLocation"]["artifactLocation"]["uri"] == f"{args[0]}/{f['location']['file']}"
        if f["location"]["tensor"]:
            assert loc["logicalLocations"][0]["name"] == f["location"]["tensor"]
    assert run["invocations"][0]["exitCode"] == report["summary"]["exit_code"]


def test_sarif_carries_skipped_checks_as_notifications(tmp_path: Path, sarif_schema: dict) -> None:
    lonely = tmp_path / "adapter"
    shutil.copytree(f"{DEMO}/llama-lora-tied", lonely)  # its relative base no longer resolves
    result = runner.invoke(app, ["check", str(lonely), "-f", "sarif"])
    doc = json.loads(result.stdout)
    jsonschema.Draft4Validator(sarif_schema).validate(doc)
    notes = doc["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert {n["descriptor"]["id"] for n in notes} >= {"base", "adapter-numbers"}
    assert result.exit_code == 1  # TIE106: a check that could not run is not a pass
    assert [r["ruleId"] for r in doc["runs"][0]["results"]] == ["TIE106"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_github_annotations(target: str) -> None:
    args = TARGETS[target]
    report = _json(args)
    result = runner.invoke(app, ["check", *args, "-f", "github"])
    assert result.exit_code == report["summary"]["exit_code"]
    lines = result.stdout.splitlines()
    assert len(lines) == len(report["findings"])
    for line, f in zip(lines, report["findings"], strict=True):
        assert GITHUB_LINE.match(line), line
        assert f"title=tieaudit ({f['code']})" in line and f"file={args[0]}/{f['location']['file']}" in line
        assert f"line={f['location']['line'] or 1}," in line


def test_github_escapes_newlines_and_percent() -> None:
    from tieaudit.model import Finding, Location, Report, Severity, Target
    from tieaudit.report import RenderOptions, render

    finding = Finding("TIE001", "x", Severity.WARNING, "50% off\nsecond line", Location("a,b:c.json", None, None, 3))
    report = Report("0", Target("ckpt", "model", None, "safetensors", ()), (), (), (finding,), ())
    out = render(report, "github", RenderOptions())
    assert out == "::warning file=ckpt/a%2Cb%3Ac.json,line=3,title=tieaudit (TIE001)::x: 50%25 off%0Asecond line\n"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_markdown_summary(target: str) -> None:
    args = TARGETS[target]
    report = _json(args)
    result = runner.invoke(app, ["check", *args, "-f", "markdown"])
    assert result.exit_code == report["summary"]["exit_code"]
    md = result.stdout
    assert md.startswith(f"## tieaudit: `{args[0]}`")
    assert ("❌ failed" in md) == (report["summary"]["exit_code"] != 0)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`TIE" in line]
    assert len(rows) == len(report["findings"])
    assert md.count("<details>") == md.count("</details>") == len(report["findings"])
    block = md.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert block.startswith("graph LR")
    broken = [g for g in report["graph"]["groups"] if g["status"] in ("diverged", "missing")]
    assert ("stroke-width:3px" in block) == bool(broken)
    for g in report["graph"]["groups"]:
        assert g["source"] in block and all(t in block for t in g["targets"])


def test_graph_mermaid_and_dot() -> None:
    path = TARGETS["broken"][0]
    mermaid = runner.invoke(app, ["graph", path, "-f", "mermaid"])
    assert mermaid.exit_code == 0
    assert mermaid.stdout.startswith("graph LR\n") and "missing" in mermaid.stdout
    assert "lm_head.weight<br/><i>not stored</i>" in mermaid.stdout
    dot = runner.invoke(app, ["graph", path, "-f", "dot"])
    assert dot.exit_code == 0
    text = dot.stdout
    assert text.startswith("digraph tieaudit {") and text.rstrip().endswith("}")
    assert '"lm_head.weight" -> "model.embed_tokens.weight"' in text and "penwidth=3" in text
    if shutil.which("dot"):  # Graphviz, when installed, must accept it
        subprocess.run(["dot", "-Tsvg"], input=text, text=True, check=True, capture_output=True)
    bad = runner.invoke(app, ["graph", path, "-f", "sarif"])
    assert bad.exit_code == 2 and "--format" in bad.stderr


@pytest.mark.parametrize("fmt", ["sarif", "github", "markdown", "json"])
def test_output_file_holds_the_document(fmt: str, tmp_path: Path) -> None:
    path = TARGETS["broken"][0]
    out = tmp_path / f"report.{fmt}"
    to_file = runner.invoke(app, ["check", path, "-f", fmt, "-o", str(out)])
    to_stdout = runner.invoke(app, ["check", path, "-f", fmt])
    assert to_file.stdout == "" and to_file.exit_code == to_stdout.exit_code == 1
    assert out.read_text() == to_stdout.stdout


def test_tieaudit_format_env_accepts_new_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIEAUDIT_FORMAT", "github")
    result = runner.invoke(app, ["check", TARGETS["broken"][0]])
    assert result.stdout.startswith("::error ")


def test_human_output_wraps_at_words_in_a_terminal(tmp_path: Path) -> None:
    """issue 18.7: in a 160-column terminal findings (single ~330-character lines) wrapped mid-word. In a terminal
    they wrap at words, continuation lines indented; paths and tensor names stay whole; into a pipe or a file each
    line stays whole (for grep)."""
    import pty

    broken = Path(__file__).resolve().parents[1] / DEMO / "llama-untied-missing-head"
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "60", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tieaudit", "check", str(broken)], stdout=follower, stderr=subprocess.PIPE, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode()).replace("\r\n", "\n")
    assert proc.returncode == 1
    lines = shown.splitlines()
    words = {w for line in lines for w in line.split()}
    for token in ("model.embed_tokens.weight", "lm_head.weight", str(broken)):
        assert token in words or any(token in line for line in lines), token  # never split
    long_lines = [line for line in lines if len(line) > 60 and " " in line.strip()]
    assert not long_lines, long_lines
    message = next(i for i, line in enumerate(lines) if "TIE002" in line) + 1
    assert lines[message].startswith("  config.json:/tie_word_embeddings is false")
    assert lines[message + 1].startswith("    ")  # continuation: two more than the first line
    piped = subprocess.run(
        [sys.executable, "-m", "tieaudit", "check", str(broken)], capture_output=True, text=True, env=env
    )
    assert any(len(line) > 200 for line in piped.stdout.splitlines())  # a pipe gets whole lines
