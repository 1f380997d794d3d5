"""Many checkpoints in one run: several PATHs, and a trainer's output directory of checkpoint-* folders. One
document covers all (JSON: the per-target reports under a combined summary; SARIF: one run per target), each
target's report is the one it gets alone, and the exit code is the worst (2, then 3, then 1, then 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from tieaudit import audit, audit_many
from tieaudit.batch import expand_targets
from tieaudit.cli.app import app
from tieaudit.errors import UsageError
from tieaudit.model import EXIT_PRIORITY, BatchReport, Report, TargetError

DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "demo"
CLEAN = DEMO / "llama-clean"
BROKEN = DEMO / "llama-untied-missing-head"
SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())
runner = CliRunner()


def check(*args: str | Path) -> object:
    return runner.invoke(app, ["check", *(str(a) for a in args), "--no-progress"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer's output directory: checkpoint-500 clean, checkpoint-1000 broken (the order is numeric, not
    lexical), an empty checkpoint-1500 that a killed run left behind, training_args.bin, runs/."""
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(CLEAN, root / "checkpoint-500")
    shutil.copytree(BROKEN, root / "checkpoint-1000")
    (root / "checkpoint-1500").mkdir()
    (root / "training_args.bin").write_bytes(b"not a model")
    (root / "runs").mkdir()
    return root


def test_expansion_of_a_trainer_directory(run_dir: Path, tmp_path: Path) -> None:
    names = [Path(t).name for t in expand_targets([str(run_dir)])]
    assert names == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]
    # the final model saved into output_dir is audited first, then the checkpoints
    final = tmp_path / "out"
    shutil.copytree(CLEAN, final)
    shutil.copytree(BROKEN, final / "checkpoint-2")
    assert expand_targets([str(final)]) == [str(final), str(final / "checkpoint-2")]
    # a plain checkpoint is itself; the same directory twice is audited once
    assert expand_targets([str(CLEAN), str(CLEAN)]) == [str(CLEAN)]
    # a symlinked checkpoint-* is not followed
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "checkpoint-1").symlink_to(CLEAN)
    assert expand_targets([str(linked)]) == [str(linked)]


def test_json_batch_document(run_dir: Path) -> None:
    result = check(CLEAN, run_dir, "-f", "json")
    doc = json.loads(result.stdout)  # one document, nothing else on stdout
    assert set(doc) == {"schema_version", "tool", "reports", "errors", "summary"}
    paths = [r["target"]["path"] for r in doc["reports"]]
    assert paths == [str(CLEAN), str(run_dir / "checkpoint-500"), str(run_dir / "checkpoint-1000")]
    assert doc["errors"] == [
        {"path": str(run_dir / "checkpoint-1500"), "message": doc["errors"][0]["message"], "exit_code": 3}
    ]
    assert doc["errors"][0]["message"].startswith(f"nothing auditable at {run_dir / 'checkpoint-1500'}")
    assert doc["summary"] == {
        "targets": 4,
        "audited": 3,
        "not_audited": 1,
        "findings": {"error": 1, "warning": 0, "info": 0},
        "fail_on": "warning",
        "exit_code": 3,
    }
    assert result.exit_code == doc["summary"]["exit_code"]
    # each report is exactly what the target gets alone
    alone = json.loads(check(run_dir / "checkpoint-1000", "-f", "json").stdout)
    assert doc["reports"][2] == alone
    assert "tieaudit: error: " in result.stderr and "checkpoint-1500" in result.stderr


@pytest.mark.parametrize(
    ("paths", "extra", "code"),
    [
        (["clean", "clean2"], [], 0),
        (["clean", "broken"], [], 1),
        (["clean", "broken"], ["--exit-zero"], 0),
        (["clean", "broken"], ["--fail-on", "error"], 1),
        (["broken", "empty"], [], 3),  # nothing to audit outranks findings
        (["broken", "empty"], ["--exit-zero"], 3),  # --exit-zero never masks 3
        (["empty", "corrupt", "broken"], [], 2),  # could not read outranks everything
        (["clean", "corrupt"], ["--exit-zero"], 2),
        (["clean", "broken"], ["--select", "TIE999"], 2),  # a usage error, before anything is read
    ],
)
def test_batch_exit_code_is_the_worst(tmp_path: Path, paths: list[str], extra: list[str], code: int) -> None:
    (tmp_path / "empty").mkdir()
    shutil.copytree(CLEAN, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\xff" * 8)
    where = {"clean": CLEAN, "clean2": tmp_path / "clean2", "broken": BROKEN}
    if "clean2" in paths:
        shutil.copytree(CLEAN, tmp_path / "clean2")
    args = [where.get(p, tmp_path / p) for p in paths]
    result = check(*args, "-f", "json", *extra)
    assert result.exit_code == code, result.stderr
    if "--select" not in extra:
        assert json.loads(result.stdout)["summary"]["exit_code"] == code
    else:
        assert result.stdout == "" and result.stderr.count("\n") == 1


def test_exit_priority_table() -> None:
    assert sorted([0, 1, 2, 3], key=EXIT_PRIORITY.__getitem__) == [0, 1, 3, 2]


def test_sarif_batch_is_one_valid_run_covering_every_target(run_dir: Path, tmp_path: Path) -> None:
    result = check(run_dir, "-f", "sarif")
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, SCHEMA)
    (run,) = doc["runs"]  # GitHub code scanning takes at most 20 runs per file; a run can save more checkpoints
    assert [r["ruleId"] for r in run["results"]] == ["TIE002"]
    uri = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri.endswith("checkpoint-1000/config.json")
    (note,) = [n for n in run["invocations"][0]["toolExecutionNotifications"] if n["level"] == "error"]
    assert "checkpoint-1500: not audited (exit 3)" in note["message"]["text"]
    assert run["invocations"][0]["executionSuccessful"] is False and run["invocations"][0]["exitCode"] == 3
    assert run["automationDetails"]["id"] == f"tieaudit/{run_dir}/"
    assert result.exit_code == 3
    # 25 checkpoints: still one run
    many = tmp_path / "many"
    for step in range(1, 26):
        shutil.copytree(CLEAN, many / f"checkpoint-{step}")
    doc = json.loads(check(many, "-f", "sarif").stdout)
    jsonschema.validate(doc, SCHEMA)
    assert len(doc["runs"]) == 1 and len(doc["runs"][0]["properties"]["targets"]) == 25


def test_github_and_markdown_batch(run_dir: Path) -> None:
    gh = check(run_dir, "-f", "github").stdout.splitlines()
    assert gh[0].startswith("::error file=") and "checkpoint-1000/config.json" in gh[0]
    assert gh[1].startswith("::error title=tieaudit (not audited)::") and "checkpoint-1500" in gh[1]
    assert len(gh) == 2
    md = check(run_dir, "-f", "markdown").stdout
    assert md.startswith("## tieaudit: 3 checkpoints ❌ failed")
    assert "| checkpoint | result | errors | warnings | info | exit |" in md
    assert f"| `{run_dir / 'checkpoint-1000'}` | ❌ failed | 1 | 0 | 0 | 1 |" in md
    assert "⚠️ not audited" in md
    # issue 18.8: a passing checkpoint is its table row, not another section with a Mermaid graph
    assert md.count("### tieaudit: `") == 1 and md.count("#### Tie graph") == 1
    assert f"1 checkpoint without findings: `{run_dir / 'checkpoint-500'}`." in md


def test_text_batch_groups_per_target(run_dir: Path) -> None:
    result = check(run_dir)
    out = result.stdout
    first, second = out.index(f"{run_dir / 'checkpoint-500'}  LlamaForCausalLM"), out.index("TIE002")
    assert first < second < out.index(f"{run_dir / 'checkpoint-1500'}  not audited")
    assert "3 checkpoints" in out and "exit 3" in out
    assert result.stderr.strip().splitlines()[-1] == (
        "tieaudit: 3 checkpoints, 1 with findings at or above warning, 1 not audited: "
        "1 error, 0 warnings, 0 info (exit 3)"
    )
    quiet = check(CLEAN, BROKEN, run_dir / "checkpoint-1500", "-q").stdout
    assert quiet.splitlines()[0] == f"── {BROKEN}"  # -q names the target of each group of findings
    assert str(CLEAN) not in quiet and "checkpoint-1500" not in quiet


def test_the_document_shape_depends_on_the_arguments_not_on_the_checkpoint_count(tmp_path: Path) -> None:
    doc = json.loads(check(BROKEN, "-f", "json").stdout)
    assert "target" in doc and "reports" not in doc  # one checkpoint directory: a single report
    run = tmp_path / "run"
    shutil.copytree(CLEAN, run / "checkpoint-500")
    doc = json.loads(check(run, "-f", "json").stdout)
    assert len(doc["reports"]) == 1  # a trainer directory is a batch from its first checkpoint on
    doc = json.loads(check(CLEAN, CLEAN, "-f", "json").stdout)
    assert len(doc["reports"]) == 1  # two PATHs (the same one): a batch of one


def test_a_target_specific_usage_error_does_not_stop_the_batch() -> None:
    adapter = DEMO / "llama-lora-tied"
    result = check(adapter, CLEAN, "--base", CLEAN, "-f", "json")
    doc = json.loads(result.stdout)
    assert [r["target"]["path"] for r in doc["reports"]] == [str(adapter)]
    (error,) = doc["errors"]
    assert error["path"] == str(CLEAN) and "--base" in error["message"] and error["exit_code"] == 2
    assert f"tieaudit: error: {CLEAN}: " in result.stderr
    assert result.exit_code == 2


def test_python_api(run_dir: Path) -> None:
    batch = audit_many([CLEAN, run_dir], fail_on="error")
    assert isinstance(batch, BatchReport)
    kinds = [type(i) for i in batch.items]
    assert kinds == [Report, Report, Report, TargetError]
    assert batch.exit_code == 3 and batch.counts()["error"] == 1
    assert batch.reports[2].findings == audit(run_dir / "checkpoint-1000").findings
    with pytest.raises(UsageError, match="at least one path"):
        audit_many([])


def test_graph_of_a_trainer_directory_draws_every_checkpoint(run_dir: Path) -> None:
    """issue 18.8: `graph outputs/` showed only the top-level model. It draws every checkpoint-* (the one that cannot
    be read is an error line on stderr, and the exit code says so); mermaid, one diagram per file, asks for one."""
    result = runner.invoke(app, ["graph", str(run_dir)])
    assert result.exit_code == 3  # checkpoint-1500 is empty: nothing to audit there
    assert f"{run_dir / 'checkpoint-500'}  LlamaForCausalLM" in result.stdout
    assert f"{run_dir / 'checkpoint-1000'}  LlamaForCausalLM" in result.stdout
    assert "checkpoint-1500" in result.stderr
    doc = json.loads(runner.invoke(app, ["graph", str(run_dir), "--format", "json"]).stdout)
    assert [Path(t["target"]["path"]).name for t in doc["targets"]] == ["checkpoint-500", "checkpoint-1000"]
    mermaid = runner.invoke(app, ["graph", str(run_dir), "--format", "mermaid"])
    assert mermaid.exit_code == 2 and "draws one checkpoint" in mermaid.stderr
