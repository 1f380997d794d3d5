"""The command line: exit codes, streams, formats, selection, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tieaudit.cli.app import app
from tieaudit.rules import all_rules

runner = CliRunner()


def run(*args: str | Path, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def ckpts(checkpoint) -> dict[str, Path]:
    return {
        "clean": checkpoint("llama", "clean", "safetensors"),
        "missing": checkpoint("llama", "untied_missing", "safetensors"),
        "diverged": checkpoint("llama", "diverged", "safetensors"),
        "redundant": checkpoint("llama", "redundant", "safetensors"),
        "t5flag": checkpoint("t5", "untied_missing", "safetensors"),
    }


@pytest.mark.parametrize(
    ("case", "args", "code"),
    [
        ("clean", [], 0),
        ("missing", [], 1),
        ("diverged", [], 1),
        ("missing", ["--exit-zero"], 0),
        ("redundant", [], 0),  # TIE006 is info, below the default fail-on
        ("redundant", ["--fail-on", "info"], 1),
        ("t5flag", [], 0),  # TIE005 info: every reader that parses config.json sees T5's forced true
        ("t5flag", ["--fail-on", "info"], 1),
        ("missing", ["--ignore", "TIE002"], 0),
        ("missing", ["--select", "TIE001,TIE003"], 0),
        ("missing", ["--select", "TIE00"], 1),
        ("missing", ["--select", "untied-weight-missing"], 1),
        ("missing", ["--select", "TIE999"], 2),
        ("missing", ["--format", "yaml"], 2),
        ("missing", ["--fail-on", "fatal"], 2),
        ("missing", ["--exit-zero", "--select", "NOPE"], 2),  # --exit-zero never masks 2
    ],
)
def test_exit_code_table(ckpts, case: str, args: list[str], code: int) -> None:
    result = run("check", ckpts[case], *args)
    assert result.exit_code == code, (result.stdout, result.stderr)


def test_json_stdout_is_one_document_and_matches_exit(ckpts) -> None:
    result = run("check", ckpts["missing"], "-f", "json")
    doc = json.loads(result.stdout)  # nothing else on stdout
    assert doc["schema_version"] == 1
    assert doc["tool"]["name"] == "tieaudit"
    assert doc["summary"]["exit_code"] == result.exit_code == 1
    assert doc["target"]["layout"] == "safetensors"
    [finding] = doc["findings"]
    assert finding["code"] == "TIE002"
    assert finding["location"]["tensor"] == "lm_head.weight"
    assert finding["location"]["config_key"] == "/tie_word_embeddings"
    config_lines = (ckpts["missing"] / "config.json").read_text().splitlines()
    assert '"tie_word_embeddings"' in config_lines[finding["location"]["line"] - 1]
    assert len(finding["fingerprint"]) == 16
    [group] = doc["graph"]["groups"]
    assert group["status"] == "missing"
    assert group["stored"] == {"model.embed_tokens.weight": "model.safetensors", "lm_head.weight": None}
    assert "tieaudit:" in result.stderr and "1 error" in result.stderr


def test_text_report_and_summary_streams(ckpts) -> None:
    result = run("check", ckpts["diverged"], "--color", "never")
    assert "TIE001" in result.stdout and "tied-weights-diverge" in result.stdout
    assert "top-1 agreement" in result.stdout
    assert "\x1b[" not in result.stdout
    assert "1 error" in result.stderr and "1 error" not in result.stdout


def test_color_always_and_no_color(ckpts) -> None:
    assert "\x1b[" in run("check", ckpts["diverged"], "--color", "always").stdout
    assert "\x1b[" not in run("check", ckpts["diverged"], env={"NO_COLOR": "1"}).stdout


def test_quiet_and_verbose(ckpts) -> None:
    quiet = run("check", ckpts["diverged"], "-q")
    assert "source  model.embed_tokens.weight" not in quiet.stdout and "TIE001" in quiet.stdout and quiet.stderr == ""
    verbose = run("check", ckpts["diverged"], "-v")
    assert "comparisons" in verbose.stdout and "on-disk" in verbose.stdout


def test_output_file_written_after_audit(ckpts, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = run("check", ckpts["missing"], "-f", "json", "-o", out)
    assert result.exit_code == 1 and result.stdout == ""
    assert json.loads(out.read_text())["summary"]["exit_code"] == 1
    bad = run("check", ckpts["missing"], "-o", tmp_path / "no" / "such" / "dir" / "r.txt")
    assert bad.exit_code == 2 and "cannot write the report" in bad.stderr


def test_tieaudit_format_env(ckpts) -> None:
    result = run("check", ckpts["clean"], env={"TIEAUDIT_FORMAT": "json"})
    assert json.loads(result.stdout)["summary"]["exit_code"] == 0


def test_graph_command(ckpts) -> None:
    text = run("graph", ckpts["missing"], "--color", "never")
    assert text.exit_code == 0 and "MISSING" in text.stdout and "(not stored)" in text.stdout
    doc = json.loads(run("graph", ckpts["clean"], "-f", "json").stdout)
    assert doc["graph"]["groups"][0]["status"] == "tied"


def test_rules_and_explain() -> None:
    listing = run("rules")
    assert listing.exit_code == 0
    for r in all_rules():
        assert r.code in listing.stdout
        assert len(r.explain) > 200, f"{r.code} needs real explain text"
        shown = run("explain", r.code)
        assert shown.exit_code == 0 and r.name in shown.stdout and "Fix" in shown.stdout
    assert json.loads(run("rules", "-f", "json").stdout)[0]["code"] == "TIE001"
    assert run("explain", "untied-weight-missing").exit_code == 0
    unknown = run("explain", "TIE999")
    assert unknown.exit_code == 2 and "unknown rule" in unknown.stderr


def test_every_rule_is_covered_by_a_verdict_test() -> None:
    from tests.test_verdicts import EXPECTED

    tested = {c for c in EXPECTED.values() if c} | {"TIE005"}
    assert {r.code for r in all_rules() if r.family == "checkpoint"} <= tested


@pytest.mark.parametrize(
    ("setup", "code", "needle"),
    [
        ("missing_path", 2, "does not exist"),
        ("file_not_dir", 2, "expected a checkpoint directory"),
        ("empty_dir", 3, "nothing auditable"),
        ("config_only", 3, "no weights"),
        ("invalid_config", 2, "config.json"),
        ("flag_not_bool", 2, "/tie_word_embeddings"),
        ("flag_null", 2, "got null"),
        ("config_rejected_by_transformers", 2, "vocab_size"),
        ("truncated", 2, "model.safetensors"),
        ("header_too_long", 2, "model.safetensors"),
        ("missing_shard", 2, "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code(
    setup: str, code: int, needle: str, tmp_path: Path, ckpts, checkpoint
) -> None:
    import shutil

    target = tmp_path / "ckpt"
    if setup == "missing_path":
        pass
    elif setup == "file_not_dir":
        target.write_text("x")
    elif setup == "empty_dir":
        target.mkdir()
    else:
        src = checkpoint("llama", "clean", "safetensors-sharded" if setup == "missing_shard" else "safetensors")
        shutil.copytree(src, target)
        weights = target / "model.safetensors"
        if setup == "config_only":
            weights.unlink()
        elif setup == "invalid_config":
            (target / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],,}')
        elif setup == "flag_not_bool":
            cfg = json.loads((target / "config.json").read_text())
            cfg["tie_word_embeddings"] = "yes"
            (target / "config.json").write_text(json.dumps(cfg, indent=2))
        elif setup in ("flag_null", "config_rejected_by_transformers"):
            cfg = json.loads((target / "config.json").read_text())
            if setup == "flag_null":
                cfg["tie_word_embeddings"] = None
            else:
                cfg["vocab_size"] = "64"
            (target / "config.json").write_text(json.dumps(cfg, indent=2))
        elif setup == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif setup == "header_too_long":
            data = weights.read_bytes()
            weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])
        elif setup == "missing_shard":
            shard = sorted(target.glob("model-*.safetensors"))[0]
            shard.unlink()
    result = run("check", target)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_pickle_payload_is_refused_and_never_run(tmp_path: Path, checkpoint) -> None:
    import shutil

    target = tmp_path / "evil"
    shutil.copytree(checkpoint("llama", "clean", "bin"), target)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"model.embed_tokens.weight": Payload()}, target / "pytorch_model.bin")
    result = run("check", target)
    assert result.exit_code == 2 and "refusing" in result.stderr
    assert not marker.exists()


def _no_torch_import(args: list[str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; sys.argv = ['tieaudit', *sys.argv[1:]]\n"
        "from tieaudit.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules)\n"
        "if sys.argv[1] in ('--version', '--help', 'rules', 'explain'):\n"
        "    heavy |= {'pydantic', 'importlib.metadata'} & set(sys.modules)\n"
        "print(f'IMPORTED {sorted(heavy)}' if heavy else 'LEAN', file=sys.stderr)\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        ["rules"],
        ["rules", "-f", "json"],
        ["explain", "TIE001"],
        ["explain", "untied-weight-missing"],
        ["check", "--help"],
        ["fix", "--help"],
    ],
)
def test_fast_paths_do_not_import_torch(args: list[str]) -> None:
    """No torch, transformers or peft; and for the start-up budget of --version, --help, rules and explain
    (< 0.3 s, benchmarks/README.md), no pydantic (typer coerces option values with it) or importlib.metadata (the
    version is a constant) either."""
    proc = _no_torch_import(args)
    assert proc.stderr.strip().endswith("LEAN"), proc.stderr


@pytest.mark.parametrize(
    "args", [["rules"], ["rules", "-f", "json"], ["rules", "--format", "text"], ["explain", "TIE104"], ["explain", "x"]]
)
def test_fast_path_prints_what_typer_prints(args: list[str]) -> None:
    exe = Path(sys.executable).parent / "tieaudit"
    fast = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
    slow = run(*args)
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.exit_code, slow.stdout, slow.stderr)


def test_version_matches_the_installed_metadata() -> None:
    from importlib.metadata import version

    from tieaudit import __version__

    assert version("tieaudit") == __version__


def test_console_script_and_module_entry() -> None:
    proc = subprocess.run([sys.executable, "-m", "tieaudit", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("tieaudit ")


@pytest.mark.parametrize(
    ("flag", "tty", "ci", "machine", "wanted"),
    [
        (None, True, False, False, True),  # a person at a terminal
        (None, False, False, False, False),  # piped
        (None, True, True, False, False),  # CI logs keep every redraw
        (None, True, False, True, False),  # a machine format's reader is a program
        (True, False, True, True, True),  # --progress wins
        (False, True, False, False, False),  # --no-progress wins
    ],
)
def test_progress_decision(monkeypatch, flag, tty, ci, machine, wanted) -> None:
    from tieaudit.cli.console import progress_wanted

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    assert progress_wanted(flag, machine) is wanted


def test_progress_bar_draws_on_stderr_only_after_the_delay(capsys, monkeypatch) -> None:
    from tieaudit.cli.console import progress_reporter

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws as on a terminal

    with progress_reporter(True, delay=3600) as update:
        assert update is not None
        update("comparing a with b", 0, 4)
    assert capsys.readouterr().err == ""  # quick work: nothing drawn
    with progress_reporter(True, delay=0) as update:
        assert update is not None
        update("comparing a with b", 1 << 20, 4 << 20)
        update("comparing c with d", 2 << 20, 4 << 20)
    captured = capsys.readouterr()
    # issue 18.6: bytes done of bytes in all, and a rate (not "0/1" pairs)
    assert "comparing c with d" in captured.err and "2.1/4.2 MB" in captured.err and "/s" in captured.err
    assert captured.out == ""


def test_progress_counts_the_bytes_it_reads(ckpts) -> None:
    """The callback gets bytes: it ends at the stored size of the pair it compared, rising as rows are read."""
    from tieaudit import audit
    from tieaudit.checkpoint import open_checkpoint

    calls: list[tuple[str, int, int]] = []
    audit(ckpts["diverged"], progress=lambda what, done, total: calls.append((what, done, total)))
    with open_checkpoint(ckpts["diverged"]) as ckpt:
        pair = ckpt.tensors["lm_head.weight"].nbytes + ckpt.tensors["model.embed_tokens.weight"].nbytes
    compared = [c for c in calls if c[0].startswith("comparing")]
    assert compared and {total for _, _, total in compared} == {pair}
    done = [d for _, d, _ in compared]
    assert done == sorted(done) and done[-1] == pair and len(set(done)) >= 3


def test_progress_on_a_real_check_keeps_stdout_clean(ckpts) -> None:
    result = run("check", ckpts["diverged"], "--progress", "-f", "json")
    json.loads(result.stdout)
    assert result.exit_code == 1


def test_progress_bar_appears_during_one_long_step(capsys, monkeypatch) -> None:
    import time as _time

    from tieaudit.cli.console import progress_reporter

    monkeypatch.setenv("FORCE_COLOR", "1")
    with progress_reporter(True, delay=0.05) as update:
        assert update is not None
        update("comparing lm_head.weight with model.embed_tokens.weight", 0, 0)
        _time.sleep(0.5)  # one long comparison: no further callback
    assert "comparing lm_head.weight" in capsys.readouterr().err


def test_report_goes_to_stdout_while_the_bar_draws_on_a_terminal(ckpts) -> None:
    """stderr on a pseudo-terminal (the bar is drawn), stdout to a pipe: the report is still on stdout, whole."""
    import pty
    import threading

    master, slave = pty.openpty()
    drawn = bytearray()

    def drain() -> None:  # a terminal reads what is drawn; an unread pty would block the writer
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "tieaudit"),
                "check",
                str(ckpts["diverged"]),
                "-f",
                "json",
                "--progress",
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            env={**os.environ, "TIEAUDIT_NO_CACHE": "1"},
            timeout=120,
        )
    finally:
        os.close(slave)
        reader.join(timeout=5)
        os.close(master)
    assert b"tieaudit:" in drawn  # the summary line went to the terminal
    doc = json.loads(proc.stdout)
    assert proc.returncode == doc["summary"]["exit_code"] == 1
