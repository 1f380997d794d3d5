"""PATH as a Hub repo id, resolved offline from a local Hugging Face cache laid out as huggingface_hub writes it
(blobs, snapshots of symlinks, refs) in a temporary HF_HUB_CACHE. transformers loads the same repo id from the
same cache, so the verdict and the library's behaviour are checked on the same files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants
from typer.testing import CliRunner

from tieaudit import audit
from tieaudit.checkpoint.hub import looks_like_repo_id, resolve
from tieaudit.cli.app import app
from tieaudit.errors import InputError, UsageError

DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "demo"
COMMIT = "a" * 40
COMMIT_V1 = "b" * 40
runner = CliRunner()


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `source`'s files in `cache` as huggingface_hub does: content-addressed blobs, a snapshot of relative
    symlinks to them, and refs naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so a relative `org/name` cannot be a local directory by accident
    return cache


def test_repo_id_is_read_from_the_cache_as_transformers_reads_it(hub: Path) -> None:
    snapshot = cache_repo(hub, "someorg/tiny-broken", DEMO / "llama-untied-missing-head", COMMIT)
    report = audit("someorg/tiny-broken")
    assert report.target.repo is not None
    assert (report.target.repo.repo_id, report.target.repo.revision, report.target.repo.commit) == (
        "someorg/tiny-broken",
        "main",
        COMMIT,
    )
    assert Path(report.target.path) == snapshot
    assert [f.code for f in report.findings] == ["TIE002"]

    # transformers, offline, resolves the same repo id to the same snapshot and really leaves lm_head to random init
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained("someorg/tiny-broken", output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]
    assert not model.config.tie_word_embeddings


def test_cli_json_names_the_repo_and_revision(hub: Path) -> None:
    cache_repo(hub, "someorg/tiny", DEMO / "llama-clean", COMMIT, refs=("main",))
    cache_repo(hub, "someorg/tiny", DEMO / "llama-untied-missing-head", COMMIT_V1, refs=("v1",))
    result = runner.invoke(app, ["check", "someorg/tiny", "-f", "json", "--no-progress"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["target"]["repo"] == {"id": "someorg/tiny", "revision": "main", "commit": COMMIT}
    # a tag, and a commit hash directly
    for rev in ("v1", COMMIT_V1):
        result = runner.invoke(app, ["check", "someorg/tiny", "--revision", rev, "-f", "json", "--no-progress"])
        assert result.exit_code == 1, result.stderr
        doc = json.loads(result.stdout)
        assert doc["target"]["repo"]["commit"] == COMMIT_V1
        assert [f["code"] for f in doc["findings"]] == ["TIE002"]
    text = runner.invoke(app, ["check", "someorg/tiny", "--revision", "v1", "--no-progress"])
    assert text.stdout.startswith("someorg/tiny@v1  LlamaForCausalLM")
    assert f"commit {COMMIT_V1} in the local Hugging Face cache" in text.stdout
    assert "tieaudit: someorg/tiny@v1: 1 error" in text.stderr
    graph = runner.invoke(app, ["graph", "someorg/tiny", "--revision", "v1", "-f", "json"])
    assert graph.exit_code == 0 and json.loads(graph.stdout)["target"]["repo"] == "someorg/tiny@v1"


def test_not_cached_is_one_clear_line_exit_2(hub: Path) -> None:
    result = runner.invoke(app, ["check", "someorg/absent", "--no-progress"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "path does not exist: someorg/absent" in lines[0]
    assert "nor is someorg/absent in the local Hugging Face cache" in lines[0]
    assert str(hub) in lines[0] and "hf download someorg/absent" in lines[0]
    cache_repo(hub, "someorg/tiny", DEMO / "llama-clean", COMMIT)
    result = runner.invoke(app, ["check", "someorg/tiny", "--revision", "v9", "--no-progress"])
    assert result.exit_code == 2
    assert "revision v9 of someorg/tiny" in result.stderr and "--revision v9" in result.stderr


def test_incomplete_snapshot_is_refused(hub: Path) -> None:
    snapshot = cache_repo(hub, "someorg/partial", DEMO / "llama-clean", COMMIT)
    listing = {name.name: {"size": name.stat().st_size, "blob_id": "0" * 40} for name in snapshot.iterdir()}
    (snapshot / "model.safetensors").unlink()  # an interrupted download
    trees = snapshot.parents[1] / "trees"
    trees.mkdir()
    (trees / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    with pytest.raises(InputError, match=r"incomplete \(1 file\(s\) are missing \(model.safetensors\)\)"):
        audit("someorg/partial")


def test_local_directory_wins_and_revision_needs_a_repo_id(hub: Path, tmp_path: Path) -> None:
    cache_repo(hub, "someorg/tiny", DEMO / "llama-untied-missing-head", COMMIT)
    shutil.copytree(DEMO / "llama-clean", tmp_path / "someorg" / "tiny")
    report = audit("someorg/tiny")  # as from_pretrained: an existing local path is never looked up in the cache
    assert report.target.repo is None and not report.findings
    with pytest.raises(UsageError, match="--revision applies to Hub repo ids"):
        audit("someorg/tiny", revision="main")
    result = runner.invoke(app, ["check", str(DEMO / "llama-clean"), str(DEMO / "llama-clean"), "--revision", "x"])
    assert result.exit_code == 2 and "give one PATH" in result.stderr


def test_adapter_as_repo_id_finds_its_base_in_the_cache(hub: Path) -> None:
    cache_repo(hub, "someorg/base", DEMO / "llama-clean", COMMIT)
    snapshot = cache_repo(hub, "someorg/lora", DEMO / "llama-lora-tied", COMMIT_V1)
    config = json.loads((snapshot / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someorg/base"
    (snapshot / "adapter_config.json").unlink()
    (snapshot / "adapter_config.json").write_text(json.dumps(config))
    report = audit("someorg/lora")
    assert report.target.kind == "adapter" and report.target.repo is not None
    assert report.target.base is not None and COMMIT in report.target.base
    assert "TIE102" in {f.code for f in report.findings}


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("org/name", True),
        ("meta-llama/Llama-3.2-1B", True),
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("gpt2", False),  # a bare name is a local path only
        ("./org/name", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("org/na--me", False),
        ("org/..", False),
        ("org/.hidden", False),
    ],
)
def test_repo_id_shape(text: str, ok: bool) -> None:
    assert looks_like_repo_id(text) is ok


def test_a_missing_local_path_is_not_looked_up(hub: Path) -> None:
    assert resolve("./nope").repo is None
    with pytest.raises(InputError, match=r"path does not exist: \./nope$"):
        audit("./nope")
    cache_repo(hub, "someorg/tiny", DEMO / "llama-clean", COMMIT)
    # as typed on the command line: `./someorg/tiny` is a (missing) local path, never the cached repo
    result = runner.invoke(app, ["check", "./someorg/tiny", "--no-progress"])
    assert result.exit_code == 2 and "path does not exist: ./someorg/tiny" in result.stderr
    assert runner.invoke(app, ["check", "someorg/tiny", "--no-progress"]).exit_code == 0


@pytest.mark.parametrize("revision", ["", " ", "main\nx"])
def test_bad_revision_is_a_usage_error(hub: Path, revision: str) -> None:
    result = runner.invoke(app, ["check", "someorg/tiny", "--revision", revision, "--no-progress"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is not a branch, tag or commit name" in result.stderr


def test_unreadable_cache_entry_says_so(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache entry the user cannot read is a permission problem, not a repo to download. The tests run as root
    (which reads everything) from an interpreter under /root (which an unprivileged user cannot run), so the denial
    is simulated where tieaudit asks for it: `os.access` on the entry's refs, after huggingface_hub found nothing."""
    cache_repo(hub, "someorg/tiny", DEMO / "llama-clean", COMMIT)
    entry = hub / "models--someorg--tiny"
    shutil.rmtree(entry / "refs")  # what huggingface_hub sees when it cannot list refs/: no revision to resolve
    (entry / "refs").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == entry / "refs" else real_access(p, mode)
    )
    with pytest.raises(InputError) as info:
        audit("someorg/tiny")
    assert info.value.message == (
        f"someorg/tiny: cannot read its entry in the local Hugging Face cache ({entry}): permission denied"
    )


@pytest.mark.parametrize("blobs", [True, False])
def test_a_cache_snapshot_is_never_fixed_in_place(hub: Path, blobs: bool) -> None:
    """issue 18.5: a cache laid out without `blobs/` symlinks (plain files, as on filesystems without symlinks) was
    edited in place. A cache is recognised by its structure, models--ORG--NAME/snapshots/REV."""
    if blobs:
        snapshot = cache_repo(hub, "someorg/broken", DEMO / "llama-untied-missing-head", COMMIT)
    else:
        snapshot = hub / "models--someorg--broken" / "snapshots" / COMMIT
        shutil.copytree(DEMO / "llama-untied-missing-head", snapshot)
        assert not any(p.is_symlink() for p in snapshot.iterdir())
    before = {p.name: p.read_bytes() for p in snapshot.iterdir()}
    result = runner.invoke(app, ["fix", str(snapshot), "--untie", "--in-place", "-y"])
    assert result.exit_code == 2 and "Hugging Face cache snapshot" in result.stderr
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == before
    out = hub.parent / "fixed"
    assert runner.invoke(app, ["fix", str(snapshot), "--untie", "--output-dir", str(out)]).exit_code == 0
