"""Configuration files: `[tool.tieaudit]` in the nearest pyproject.toml, `tieaudit.toml`, `--config`, `--isolated`,
and precedence (flags, then TIEAUDIT_FORMAT, then the file, then the defaults). Bad configuration is exit 2 with
one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tieaudit.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def redundant(checkpoint) -> Path:
    return checkpoint("llama", "redundant", "safetensors")  # one TIE006 (info): exit 0 by default


def check(ckpt: Path, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["check", str(ckpt), *args], env={"TIEAUDIT_FORMAT": "", **(env or {})})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_pyproject_settings_and_flags_win(redundant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.tieaudit]\nfail-on = "info"\n')
    monkeypatch.chdir(tmp_path)
    assert check(redundant).exit_code == 1  # the file's fail-on
    assert check(redundant, "--fail-on", "warning").exit_code == 0  # the flag wins
    assert check(redundant, "--isolated").exit_code == 0  # the file is ignored
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert check(redundant).exit_code == 1  # found from a subdirectory, upward


def test_pyproject_without_table_is_skipped(redundant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "pyproject.toml", '[tool.tieaudit]\nfail-on = "info"\n')
    write(tmp_path / "inner" / "pyproject.toml", '[project]\nname = "inner"\n')  # no [tool.tieaudit]: not ours
    monkeypatch.chdir(tmp_path / "inner")
    assert check(redundant).exit_code == 1


def test_tieaudit_toml_wins_over_pyproject(redundant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "pyproject.toml", '[tool.tieaudit]\nfail-on = "info"\n')
    write(tmp_path / "tieaudit.toml", 'fail-on = "error"\n')
    monkeypatch.chdir(tmp_path)
    assert check(redundant, "--fail-on", "info").exit_code == 1
    assert check(redundant).exit_code == 0


def test_select_ignore_and_per_path(redundant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path / "tieaudit.toml", 'fail-on = "info"\nignore = ["TIE006"]\n')
    monkeypatch.chdir(tmp_path)
    assert check(redundant).exit_code == 0  # ignored by the file
    assert check(redundant, "--ignore", "TIE005").exit_code == 1  # --ignore replaces the file's list
    cfg.write_text('fail-on = "info"\nselect = ["TIE1"]\n')
    assert check(redundant).exit_code == 0  # only adapter rules selected
    assert check(redundant, "--select", "TIE0").exit_code == 1
    cfg.write_text(f'fail-on = "info"\n[per-path-ignores]\n"{redundant.parent.as_posix()}/*" = ["TIE006"]\n')
    assert check(redundant).exit_code == 0  # the path matches the glob
    assert check(redundant, "--select", "TIE006").exit_code == 0  # per-path ignores still apply


def test_format_precedence(redundant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "tieaudit.toml", 'format = "json"\nfail-on = "info"\n')
    monkeypatch.chdir(tmp_path)
    assert json.loads(check(redundant).stdout)["summary"]["exit_code"] == 1  # the file's format
    assert check(redundant, env={"TIEAUDIT_FORMAT": "github"}).stdout.startswith("::notice ")  # env beats file
    assert check(redundant, "-f", "text", env={"TIEAUDIT_FORMAT": "github"}).stdout.startswith(str(redundant))


def test_explicit_config_file(redundant: Path, tmp_path: Path) -> None:
    cfg = write(tmp_path / "ci" / "strict.toml", 'fail-on = "info"\n')
    assert check(redundant, "--config", str(cfg)).exit_code == 1
    result = check(redundant, "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2 and "no such file" in result.stderr


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('fail_on = "info"\n', "unknown key 'fail_on'"),
        ('fail-on = "loud"\n', "fail-on must be one of"),
        ('format = "yaml"\n', "format must be one of"),
        ("select = 3\n", "select must be a list"),
        ('ignore = ["TIE999"]\n', "unknown rule selector 'TIE999'"),
        ('per-path-ignores = "x"\n', "per-path-ignores must be a table"),
        ("fail-on = \n", "invalid TOML"),
    ],
)
def test_bad_config_is_exit_2_naming_the_key(
    text: str, needle: str, redundant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "tieaudit.toml", text)
    monkeypatch.chdir(tmp_path)
    result = check(redundant)
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "tieaudit.toml" in lines[0], result.stderr
    assert check(redundant, "--isolated").exit_code == 0  # --isolated never reads it


def test_fix_and_merge_read_fail_on_and_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "tieaudit.toml", 'format = "json"\n')
    monkeypatch.chdir(tmp_path)
    demo = Path(__file__).resolve().parent.parent / "fixtures" / "demo"
    result = runner.invoke(
        app, ["merge", str(demo / "llama-lora-tied"), "--output-dir", str(tmp_path / "m")], env={"TIEAUDIT_FORMAT": ""}
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["merge_run"]["groups"][0]["result"] == "tied"
    result = runner.invoke(
        app,
        ["fix", str(demo / "llama-untied-missing-head"), "--untie", "--dry-run"],
        env={"TIEAUDIT_FORMAT": ""},
    )
    assert result.exit_code == 1 and json.loads(result.stdout)["fix_run"]["dry_run"] is True
