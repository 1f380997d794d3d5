"""The GitHub Action (action.yml) and the pre-commit hook (.pre-commit-hooks.yaml): their inputs, and the check
step's script run for real with bash against the demo checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "fixtures" / "demo"


def action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def test_action_inputs_and_steps() -> None:
    doc = action()
    inputs = doc["inputs"]
    assert inputs["paths"]["required"] is True
    assert {k: v.get("default") for k, v in inputs.items() if k != "paths"} == {
        "base": "",
        "format": "github",
        "fail-on": "warning",
        "sarif": "false",
        "sarif-dir": "tieaudit-sarif",
        "python-version": "3.11",
        "torch-index-url": "https://download.pytorch.org/whl/cpu",
    }
    assert doc["runs"]["using"] == "composite"
    steps = doc["runs"]["steps"]
    used = " ".join(str(s) for s in steps)
    for name in inputs:  # every input is used by some step
        assert f"inputs.{name}" in used, name
    install = next(s for s in steps if s.get("name") == "Install tieaudit")
    assert install["run"].index("torch") < install["run"].index("ACTION_PATH")  # CPU torch first
    upload = steps[-1]
    assert upload["uses"].startswith("github/codeql-action/upload-sarif@") and "inputs.sarif ==" in upload["if"]
    assert doc["outputs"]["exit-code"]["value"] == "${{ steps.check.outputs.exit-code }}"


def _run_check_step(tmp_path: Path, **inputs: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    step = next(s for s in action()["runs"]["steps"] if s.get("id") == "check")
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key, value in step["env"].items():
        name = re.fullmatch(r"\$\{\{ inputs\.([\w-]+) \}\}", value).group(1)
        env[key] = inputs.get(name, action()["inputs"][name].get("default", ""))
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"  # the installed `tieaudit`
    env["GITHUB_OUTPUT"] = str(tmp_path / "github_output")
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        ["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    outputs = dict(line.split("=", 1) for line in (tmp_path / "github_output").read_text().splitlines() if "=" in line)
    return proc, outputs


def test_action_check_step_exits_with_the_worst_and_writes_sarif(tmp_path: Path) -> None:
    paths = f"{DEMO / 'llama-clean'} {DEMO / 'llama-untied-missing-head'}"
    proc, outputs = _run_check_step(tmp_path, paths=paths, sarif="true")
    assert proc.returncode == 1 and outputs["exit-code"] == "1", proc.stderr
    assert proc.stdout.count("::error ") == 1  # annotations from the broken checkpoint only
    files = sorted((tmp_path / "tieaudit-sarif").glob("*.sarif"))
    assert [f.name for f in files] == ["1.sarif", "2.sarif"]
    ids = {json.loads(f.read_text())["runs"][0]["automationDetails"]["id"] for f in files}
    assert len(ids) == 2  # one code-scanning category per checkpoint
    proc, outputs = _run_check_step(tmp_path / "clean", paths=str(DEMO / "llama-clean"))
    assert proc.returncode == 0 and outputs["exit-code"] == "0"


def test_pre_commit_hooks() -> None:
    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert set(hooks) == {"tieaudit", "tieaudit-system"}
    assert hooks["tieaudit"]["language"] == "python" and hooks["tieaudit-system"]["language"] == "system"
    for hook in hooks.values():
        assert hook["entry"] == "tieaudit check" and hook["pass_filenames"] is False
        pattern = re.compile(hook["files"])
        for changed in ("ckpt/config.json", "ckpt/model-00001-of-00002.safetensors", "lora/adapter_config.json"):
            assert pattern.search(changed), changed
        assert not pattern.search("src/train.py")
    assert hooks["tieaudit"]["files"] == hooks["tieaudit-system"]["files"]


def _git(cwd: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def test_pre_commit_system_hook_runs_for_real(tmp_path: Path) -> None:
    """pre-commit itself runs the `tieaudit-system` hook of this repository's .pre-commit-hooks.yaml on a commit
    that changes a broken checkpoint: the hook fails with the finding, and installs no environment."""
    hook_repo = tmp_path / "hooks"
    hook_repo.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hook_repo)
    _git(hook_repo, "init", "-q")
    _git(hook_repo, "add", ".")
    _git(hook_repo, "commit", "-q", "-m", "hooks")
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hook_repo, capture_output=True, text=True).stdout.strip()
    project = tmp_path / "project"
    shutil.copytree(DEMO / "llama-untied-missing-head", project / "ckpt")
    config = {
        "repos": [
            {
                "repo": str(hook_repo),
                "rev": rev,
                "hooks": [{"id": "tieaudit-system", "args": ["ckpt", "--fail-on", "error"]}],
            }
        ]
    }
    (project / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config))
    _git(project, "init", "-q")
    _git(project, "add", ".")
    env = {
        **os.environ,
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def pre_commit() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pre_commit", "run", "--all-files"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = pre_commit()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tieaudit check (the installed tieaudit)" in proc.stdout and "Failed" in proc.stdout
    assert "TIE002 untied-weight-missing error" in proc.stdout
    (project / "ckpt").rename(project / "moved")  # nothing the hook watches changed: skipped, not failed
    shutil.copytree(DEMO / "llama-clean", project / "ckpt")
    _git(project, "add", "-A")
    proc = pre_commit()
    assert proc.returncode == 0 and "Passed" in proc.stdout, proc.stdout + proc.stderr


def test_action_gives_the_base_to_adapters_only(tmp_path: Path) -> None:
    """issue 18.2: with `paths: <model> <adapter>` and `base: ./base` (the README's example) the model path failed
    with "--base is for adapters" (exit 2) and its TIE002 was never reported. The base now goes to adapters only,
    one for all or per adapter (ADAPTER=BASE)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(DEMO / "llama-untied-missing-head", work / "final")
    shutil.copytree(DEMO / "llama-lora-tied", work / "lora")
    shutil.copytree(DEMO / "llama-clean", work / "base")
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "nowhere/not-cached"  # only the action's base can find it
    (work / "lora" / "adapter_config.json").write_text(json.dumps(config))
    for base in ("./base", "./elsewhere lora=./base"):  # one base for all; a pair wins over it
        proc, outputs = _run_check_step(work, paths="final lora", base=base, format="json")
        assert outputs["exit-code"] == "1", (base, proc.stderr)
        assert "--base is for adapters" not in proc.stderr
        reports = [json.loads(doc) for doc in _json_documents(proc.stdout)]
        codes = {r["target"]["path"]: {f["code"] for f in r["findings"]} for r in reports}
        assert codes == {"final": {"TIE002"}, "lora": {"TIE102"}}, (base, codes)
    proc, outputs = _run_check_step(work, paths="final lora", format="json")  # no base: the adapter's is missing
    assert outputs["exit-code"] == "1"
    assert "TIE106" in proc.stdout


def _json_documents(text: str) -> list[str]:
    """The JSON reports one after another on stdout (one per path)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        _, end = decoder.raw_decode(text, i)
        docs.append(text[i:end])
        i = end
    return docs
