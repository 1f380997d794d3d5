"""`tieaudit fix`: every repaired checkpoint is loaded with transformers and compared with what the user meant.

The reference is the in-memory model each fixture saved (``intended_model``): for a diverged pair the two
trained tensors, for an untied save with a missing head the tied model. A fix passes when transformers loads
the result with no missing key and no "will NOT tie" warning, computes those logits, still computes them after
``model.tie_weights()``, and ``tieaudit check`` on the result exits 0. Faults (read-only target, full disk,
SIGKILL at every step of the write, non-empty output) must leave the original intact and exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures.builders import ARCHS, model_logits
from tests.expect import alarms_beyond_flag_ignoring_readers, ignores_flag
from tieaudit import audit
from tieaudit.cli.app import app
from tieaudit.repair.fix import fix
from tieaudit.repair.jsonedit import set_json_values

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent

# (variant, mode) pairs that have a fix, and what stays unfixable
FIXABLE = [("diverged", "untie"), ("untied_missing", "untie"), ("untied_missing", "retie"), ("redundant", "retie")]
LAYOUTS = ["safetensors", "safetensors-sharded", "bin"]


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def copy_of(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def assert_loads_as_intended(path: Path, arch: str, reference: torch.Tensor, outcome) -> None:
    result = outcome(path, arch)
    assert result.error is None, result.error
    assert not result.missing_keys, result.missing_keys
    assert not result.not_tied and not any("will NOT tie" in w for w in result.warnings), result.warnings
    assert not result.broken
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = ARCHS[arch].model_class.from_pretrained(str(path))
    torch.testing.assert_close(model_logits(model, arch), reference, rtol=0, atol=1e-6)
    model.tie_weights()
    torch.testing.assert_close(model_logits(model, arch), reference, rtol=0, atol=1e-6)


# T5 cannot be untied from the files (T5Config forces the tie): test_t5_untie_explains_why_it_cannot
MATRIX = [
    (arch, variant, mode, layout)
    for arch in sorted(ARCHS)
    for variant, mode in FIXABLE
    for layout in LAYOUTS
    if not (arch == "t5" and variant == "diverged")
]


@pytest.mark.parametrize(("arch", "variant", "mode", "layout"), MATRIX)
def test_fix_loads_as_intended(
    arch: str, variant: str, mode: str, layout: str, checkpoint, outcome, intended, tmp_path: Path
) -> None:
    src = checkpoint(arch, variant, layout)
    before = tree_hash(src)
    out = tmp_path / "fixed"
    # a .bin without the head shows nothing of what the head held: copying the embedding is the unsafe guess here
    guess = layout.startswith("bin") and variant == "untied_missing"
    report = fix(src, mode=mode, output_dir=out, unsafe_fixes=guess)

    assert report.fix_run is not None and report.fix_run.written_to == str(out)
    unfixable = {f.fingerprint for f in audit(src).findings if ignores_flag(f)}  # (a reader ignores the flag)
    repairable = [o for o in report.fixes if o.fingerprint not in unfixable]
    assert repairable and all(o.status == "fixed" for o in repairable), report.fixes
    assert report.fix_run.total == len(report.fixes)
    assert report.fix_run.fixed == sum(o.status == "fixed" for o in report.fixes) >= len(repairable)
    assert not alarms_beyond_flag_ignoring_readers(report.findings), report.findings
    assert tree_hash(src) == before  # --output-dir never touches PATH
    assert not alarms_beyond_flag_ignoring_readers(audit(out).findings)
    assert_loads_as_intended(out, arch, intended(arch, variant), outcome)


@pytest.mark.parametrize("mode", ["untie", "retie"])
@pytest.mark.parametrize("variant", ["both_missing", "shape_mismatch"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
def test_unfixable_cases_write_nothing(arch: str, variant: str, mode: str, checkpoint, tmp_path: Path) -> None:
    src = checkpoint(arch, variant, "safetensors")
    out = tmp_path / "fixed"
    report = fix(src, mode=mode, output_dir=out)
    assert report.fix_run is not None and report.fix_run.written_to is None
    assert not out.exists()
    assert report.exit_code == 1
    assert all(o.status == "not-fixed" for o in report.fixes)
    assert all(o.applicability == "manual" for o in report.fixes)


def test_t5_untie_explains_why_it_cannot(checkpoint, tmp_path: Path) -> None:
    """T5Config forces tie_word_embeddings=true: no file edit unties T5, and tieaudit says so."""
    src = checkpoint("t5", "diverged", "safetensors")
    report = fix(src, mode="untie", output_dir=tmp_path / "out")
    assert report.fix_run is not None and report.fix_run.written_to is None
    [outcome] = report.fixes
    assert outcome.code == "TIE001" and outcome.status == "not-fixed"
    assert "forces tie_word_embeddings=true" in outcome.action
    assert any("tie_weights() re-ties" in n for n in report.fix_run.notes)


def test_t5_flag_fix_keeps_decoder_scaling(tmp_path: Path, outcome) -> None:
    """Writing tie_word_embeddings=true on T5 v1.1 would switch decoder-output scaling on; the fix pins it."""
    from fixtures.builders import build_checkpoint

    src = build_checkpoint("t5", "clean", "safetensors", tmp_path / "t5")
    data = json.loads((src / "config.json").read_text())
    data["tie_word_embeddings"] = False  # a T5 v1.1-style config: means "no scaling" to T5Config
    data.pop("scale_decoder_outputs", None)
    (src / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    from transformers import T5ForConditionalGeneration

    reference = model_logits(T5ForConditionalGeneration.from_pretrained(str(src)), "t5")
    report = fix(src, mode="untie", output_dir=tmp_path / "out")
    assert [o.status for o in report.fixes] == ["fixed"]
    fixed = json.loads((tmp_path / "out" / "config.json").read_text())
    assert fixed["tie_word_embeddings"] is True and fixed["scale_decoder_outputs"] is False
    assert_loads_as_intended(tmp_path / "out", "t5", reference, outcome)


def test_retie_of_differing_tensors_needs_unsafe_and_a_source(checkpoint, tmp_path: Path) -> None:
    src = checkpoint("llama", "diverged", "safetensors-sharded")
    report = fix(src, mode="retie", output_dir=tmp_path / "a")
    [o] = report.fixes
    assert o.status == "not-fixed" and o.applicability == "unsafe" and "--unsafe-fixes" in o.action
    assert not (tmp_path / "a").exists()

    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(src / index["lm_head.weight"]), "pt") as fh:
        head = fh.get_tensor("lm_head.weight")
    with safe_open(str(src / index["model.embed_tokens.weight"]), "pt") as fh:
        embed = fh.get_tensor("model.embed_tokens.weight")
    for winner, values in (("lm_head.weight", head), ("model.embed_tokens.weight", embed)):
        out = tmp_path / winner
        report = fix(src, mode="retie", output_dir=out, unsafe_fixes=True, sources=[winner])
        [o] = report.fixes
        assert o.status == "fixed" and o.applicability == "unsafe"
        assert report.exit_code == 0 and audit(out).exit_code == 0
        model = LlamaForCausalLM.from_pretrained(str(out))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight.detach(), values)
        assert "lm_head.weight" not in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def test_in_place_sharded_fix_writes_one_new_shard(checkpoint, tmp_path: Path, outcome, intended) -> None:
    """The in-place sharded fix costs the bytes of the missing tensor: other shards keep their inodes."""
    src = copy_of(checkpoint("llama", "untied_missing", "safetensors-sharded"), tmp_path / "ckpt")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    inodes = {p.name: p.stat().st_ino for p in src.glob("*.safetensors")}
    result = runner.invoke(app, ["fix", str(src), "--untie", "--in-place", "-y", "-f", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["fix_run"]["written_to"] == str(src)
    assert doc["summary"]["exit_code"] == 0
    assert "fixed 1 of 1" in result.stderr
    head_bytes = 64 * 16 * 4
    new = [c for c in doc["fix_run"]["changes"] if c["kind"] == "new-file"]
    assert [c["bytes"] for c in new] == [head_bytes]
    assert doc["fix_run"]["bytes_written"] < head_bytes + 4096  # the tensor, a header and the index
    for name, ino in inodes.items():
        assert (src / name).stat().st_ino == ino, f"{name} was rewritten"
    assert not list(tmp_path.glob(".*tieaudit-tmp*"))
    assert (src / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert_loads_as_intended(src, "llama", intended("llama", "untied_missing"), outcome)


def test_output_dir_preserves_every_other_file(checkpoint, tmp_path: Path) -> None:
    src = copy_of(checkpoint("gemma3", "untied_missing", "safetensors"), tmp_path / "ckpt")
    extras = {
        "tokenizer.json": b'{"model": {}}',
        "generation_config.json": b'{\n  "do_sample": true\n}\n',
        "README.md": b"# my model\n\xe2\x9c\x93\n",
        "original/params.json": b'{"dim": 16}',
    }
    for rel, data in extras.items():
        (src / rel).parent.mkdir(exist_ok=True)
        (src / rel).write_bytes(data)
    before = tree_hash(src)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is fine
    report = fix(src, mode="untie", output_dir=out)
    assert report.exit_code == 0
    assert tree_hash(src) == before
    after = tree_hash(out)
    for rel in extras:
        assert after[rel] == before[rel]
    # the single file was rewritten; config.json changed by exactly the flag lines
    assert after["model.safetensors"] != before["model.safetensors"]
    old = (src / "config.json").read_text().splitlines()
    new = (out / "config.json").read_text().splitlines()
    assert len(old) == len(new)
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert changed and all("tie_word_embeddings" in a and "false" in b for a, b in changed)


def test_dry_run_and_diff_write_nothing(checkpoint) -> None:
    src = checkpoint("llama", "untied_missing", "safetensors-sharded")
    before = tree_hash(src)
    result = runner.invoke(app, ["fix", str(src), "--untie", "--dry-run"])
    assert result.exit_code == 1, result.stderr
    assert "would fix 1 of 1" in result.stderr
    result = runner.invoke(app, ["fix", str(src), "--untie", "--diff"])
    assert result.exit_code == 1
    assert '+    "lm_head.weight": "model-tieaudit.safetensors",' in result.stdout
    assert "+ lm_head.weight  [64, 16] F32  4,096 bytes" in result.stdout
    assert tree_hash(src) == before
    clean = checkpoint("llama", "clean", "safetensors")
    result = runner.invoke(app, ["fix", str(clean), "--untie", "--dry-run", "-f", "json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["fix_run"]["changes"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--untie", "--retie", "--output-dir", "X"], "one strategy"),
        (["--output-dir", "X"], "one strategy"),
        (["--untie"], "choose where to write"),
        (["--untie", "--in-place"], "pass -y"),
        (["--untie", "--in-place", "-y", "--output-dir", "X"], "exclude each other"),
        (["--retie", "--source", "lm_head.weight", "--output-dir", "X"], "needs --unsafe-fixes"),
        (["--retie", "--unsafe-fixes", "--source", "nope.weight", "--output-dir", "X"], "no such stored tensor"),
    ],
)
def test_usage_errors(args: list[str], message: str, checkpoint, tmp_path: Path) -> None:
    src = checkpoint("llama", "diverged", "safetensors")
    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    result = runner.invoke(app, ["fix", str(src), *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "X").exists()


def test_non_empty_output_dir_and_adapter_are_refused(checkpoint, adapter_case, tmp_path: Path) -> None:
    src = checkpoint("llama", "diverged", "safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["fix", str(src), "--untie", "--output-dir", str(out)])
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _, adapter, _ = adapter_case("llama", "lora_embed")
    result = runner.invoke(app, ["fix", str(adapter), "--untie", "--output-dir", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "tieaudit merge" in result.stderr


def _read_only(path: Path, on: bool) -> None:
    """chmod for users; root ignores modes, so it gets the immutable attribute instead."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        os.chmod(path, 0o555 if on else 0o755)


def test_read_only_checkpoint_in_place(checkpoint, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    src = copy_of(checkpoint("llama", "untied_missing", "safetensors"), parent / "ckpt")
    before = tree_hash(src)
    _read_only(parent, True)
    try:
        result = runner.invoke(app, ["fix", str(src), "--untie", "--in-place", "-y"])
        out = runner.invoke(app, ["fix", str(src), "--untie", "--output-dir", str(parent / "out")])
    finally:
        _read_only(parent, False)
    assert out.exit_code == 2 and "permission denied" in out.stderr, out.stderr
    assert result.exit_code == 2 and "no write permission" in result.stderr
    assert tree_hash(src) == before


def _cli(
    args: list[str], env: dict[str, str] | None = None, fsize: int | None = None, fault: str | None = None
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``fault``: run it through tests/faultrun.py with that fault."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            *([str(ROOT / "tests" / "faultrun.py"), fault] if fault else ["-m", "tieaudit"]),
            "fix",
            *args,
        ],
        capture_output=True,
        text=True,
        env=full_env,
        preexec_fn=limit,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_full_disk_leaves_original_intact(checkpoint, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 2 KiB fail with EFBIG, as a full disk would."""
    src = copy_of(checkpoint("llama", "untied_missing", "safetensors"), tmp_path / "ckpt")
    before = tree_hash(src)
    proc = _cli([str(src), "--untie", "--in-place", "-y"], fsize=2048)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the fixed checkpoint" in proc.stderr and "unchanged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_hash(src) == before
    assert not list(tmp_path.glob(".*tieaudit-tmp*"))
    proc = _cli([str(src), "--untie", "--output-dir", str(tmp_path / "out")], fsize=2048)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("point", ["staged", "weights", "index", "config", "verified", "committed"])
def test_sigkill_at_any_step_leaves_old_or_fixed(point: str, checkpoint, tmp_path: Path, outcome, intended) -> None:
    src = copy_of(checkpoint("llama", "untied_missing", "safetensors-sharded"), tmp_path / "ckpt")
    before = tree_hash(src)
    proc = _cli([str(src), "--untie", "--in-place", "-y"], fault=point)
    assert proc.returncode == -9, proc.stderr
    state = tree_hash(src)
    if point == "committed":
        assert audit(src).exit_code == 0  # fully fixed: the switch happened before the kill
    else:
        assert state == before  # untouched: the kill came before the switch
    leftovers = list(tmp_path.glob(".ckpt.tieaudit-tmp-*"))
    assert leftovers  # the dead run's staging directory, clearly named
    proc = _cli([str(src), "--untie", "--in-place", "-y"])
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob(".ckpt.tieaudit-tmp-*"))  # the next run removed it
    assert_loads_as_intended(src, "llama", intended("llama", "untied_missing"), outcome)


def test_json_edit_is_minimal() -> None:
    text = '{\n  "a": 1,\n  "text_config": {\n    "b": true\n  },\n  "tie_word_embeddings": true\n}\n'
    out = set_json_values(text, {"/tie_word_embeddings": False, "/text_config/tie_word_embeddings": False})
    assert json.loads(out) == {
        "a": 1,
        "text_config": {"tie_word_embeddings": False, "b": True},
        "tie_word_embeddings": False,
    }
    assert out.count("\n") == text.count("\n") + 1  # one inserted line, one edited in place
    minified = '{"a":1,"tie_word_embeddings":true}'
    assert json.loads(set_json_values(minified, {"/tie_word_embeddings": False}))["tie_word_embeddings"] is False


@pytest.mark.parametrize(
    ("arch", "variant"),
    [("llama", "diverged"), ("gpt2", "untied_missing"), ("gemma3", "untied_missing"), ("bert", "redundant"),
     ("t5", "untied_missing"), ("t5", "diverged")],
)  # fmt: skip
def test_every_fix_hint_command_fixes_its_finding(arch: str, variant: str, checkpoint, tmp_path: Path) -> None:
    """The commands `tieaudit check` prints as fixes are real: run as printed, they remove the finding."""
    import shlex

    src = checkpoint(arch, variant, "safetensors")
    report = audit(src)
    assert report.findings
    for n, finding in enumerate(report.findings):
        assert finding.fix is not None and finding.fix.command, finding
        argv = shlex.split(finding.fix.command.replace("FIXED_DIR", str(tmp_path / f"out{n}")))
        assert argv[:3] == ["tieaudit", "fix", str(src)]
        result = runner.invoke(app, argv[1:])
        assert result.exit_code in (0, 1), result.stderr
        remaining = {(f.code, f.location.tensor) for f in audit(tmp_path / f"out{n}").findings}
        assert (finding.code, finding.location.tensor) not in remaining


def test_index_that_disagrees_with_the_shards_is_regenerated(checkpoint, tmp_path: Path) -> None:
    src = copy_of(checkpoint("llama", "clean", "safetensors-sharded"), tmp_path / "ckpt")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    wm["lm_head.weight"] = wm["model.embed_tokens.weight"]  # listed, but no shard holds it
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    assert [f.code for f in audit(src).findings] == ["TIE005"]
    report = fix(src, mode="untie", in_place=True)
    assert [(o.code, o.status) for o in report.fixes] == [("TIE005", "fixed")]
    assert "lm_head.weight" not in json.loads(index_path.read_text())["weight_map"]
    assert audit(src).exit_code == 0


def test_missing_path_is_an_input_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["fix", str(tmp_path / "nope"), "--untie", "--in-place", "-y"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


@pytest.mark.parametrize(
    ("variant", "rewritten"), [("untied_missing", "model.safetensors"), ("diverged", "config.json")]
)
def test_in_place_fix_keeps_mode_owner_and_xattrs(checkpoint, tmp_path: Path, variant: str, rewritten: str) -> None:
    """issue 18.4: a 0600 model.safetensors came back 0644 after `fix --in-place`. Every rewritten file keeps the
    mode, owner and extended attributes of the file it replaces."""
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama", variant, "safetensors"), src)
    path = src / rewritten
    os.chmod(path, 0o600)
    try:
        os.setxattr(path, "user.tieaudit-test", b"keep me")
        xattr = True
    except OSError:  # a filesystem without user xattrs: the mode and owner are still checked
        xattr = False
    was = os.stat(path)
    report = fix(src, mode="untie", in_place=True)
    assert report.fix_run is not None and rewritten in {c.file for c in report.fix_run.changes}
    now = os.stat(path)
    assert now.st_ino != was.st_ino  # really rewritten, not left alone
    assert stat.S_IMODE(now.st_mode) == 0o600
    assert (now.st_uid, now.st_gid) == (was.st_uid, was.st_gid)
    if xattr:
        assert os.getxattr(path, "user.tieaudit-test") == b"keep me"


def test_a_dropped_head_without_evidence_is_not_called_safe(checkpoint, tmp_path: Path) -> None:
    """issue 18.3: on a .bin of an untied model whose lm_head was dropped, TIE002 said "the saved model shared" the
    pair and called `fix --untie` safe, which copies the embedding into a head that may have been trained apart.
    Now the finding says what the files show, and the copy needs --unsafe-fixes."""
    src = checkpoint("llama", "untied_missing", "bin")
    [finding] = audit(src).findings
    assert finding.code == "TIE002" and finding.fix is not None
    assert finding.fix.applicability == "unsafe" and "--unsafe-fixes" in (finding.fix.command or "")
    assert "nothing in the files shows what lm_head.weight held" in finding.fix.description
    assert finding.evidence["saved_tied"] is False and "shared" not in finding.fix.description
    refused = fix(src, mode="untie", output_dir=tmp_path / "refused")
    [outcome] = refused.fixes
    assert outcome.status != "fixed" and outcome.applicability == "unsafe" and "--unsafe-fixes" in outcome.action
    assert not (tmp_path / "refused").exists()
    done = fix(src, mode="untie", output_dir=tmp_path / "done", unsafe_fixes=True)
    assert [o.status for o in done.fixes] == ["fixed"]
    # the same head dropped by save_pretrained (safetensors, format pt): the dropping rule is the evidence
    [saved] = audit(checkpoint("llama", "untied_missing", "safetensors")).findings
    assert saved.fix is not None and saved.fix.applicability == "safe"
    assert "save_pretrained wrote model.safetensors and drops a tensor only when it shares storage" in (
        saved.fix.description
    )
