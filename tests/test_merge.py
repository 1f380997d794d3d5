"""`tieaudit merge`: the merged model must compute what the unmerged PeftModel computes.

The reference is always the real thing: the adapter is built with peft (non-zero deltas) and loaded with
``PeftModel.from_pretrained`` on the base; the merged directory is loaded with ``from_pretrained``. A merge passes
when the logits agree (float32: max |diff| <= 1e-4 x the logit scale), also after ``model.tie_weights()``,
``tieaudit check`` on it exits 0, and a tied pair the adapter keeps equal is still tied (flag true, no stored head)
while one it does not is untied (both stored, flag false). Every ground-truth case runs on Llama, Gemma 2, GPT-2
and OPT; the adapter configurations peft merges wrongly are among them.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fixtures.adapter_builders import (
    ADAPTER_ARCHS,
    ADAPTER_CASES,
    ADAPTER_SPECS,
    build_custom_adapter,
    case_base_tied,
    peft_logits,
    probe_ids,
)
from tests.expect import alarms_beyond_flag_ignoring_readers
from tieaudit import audit
from tieaudit.cli.app import app
from tieaudit.repair.merge import merge

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
CASES = [(a, c) for a in ADAPTER_ARCHS for c in ADAPTER_CASES]
TOL = 1e-4  # x the logit scale (float32)
RUNTIME_TOL = 1e-5  # effective embedding vs head, as in test_adapter_verdicts


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        return model(input_ids=probe_ids(vocab)).logits.float()


def stored_names(path: Path) -> set[str]:
    names: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            names |= set(fh.keys())
    return names


def assert_reproduces(out: Path, reference: torch.Tensor, scale: float | None = None) -> None:
    """Loaded with transformers, the merged model gives the adapter's logits, also after tie_weights()."""
    scale = scale if scale is not None else float(reference.abs().max())
    model = load(out)
    got = logits_of(model)
    assert (got - reference).abs().max().item() <= TOL * scale, ((got - reference).abs().max().item(), scale)
    model.tie_weights()
    again = logits_of(model)
    assert (again - reference).abs().max().item() <= TOL * scale


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_merge_reproduces_the_adapter(case: tuple[str, str], adapter_case, tmp_path: Path) -> None:
    arch, name = case
    base, adapter, real = adapter_case(arch, name)
    spec = ADAPTER_SPECS[arch]
    before = tree_hash(base), tree_hash(adapter)
    out = tmp_path / "merged"

    report = merge(adapter, base=base, output_dir=out)

    assert not alarms_beyond_flag_ignoring_readers(report.findings), report.findings
    assert_reproduces(out, real.peft_logits, real.logit_scale)
    assert not alarms_beyond_flag_ignoring_readers(audit(out).findings)
    assert (tree_hash(base), tree_hash(adapter)) == before  # inputs untouched

    config = json.loads((out / "config.json").read_text())
    stored = stored_names(out)
    if case_base_tied(name) and real.runtime_embed_vs_head <= RUNTIME_TOL:
        # the adapter keeps the pair equal: still tied, one stored tensor, the edit applied once
        assert config["tie_word_embeddings"] is True and spec.head_weight not in stored
        assert [g.result for g in report.merge_run.groups] == ["tied"]
    else:
        assert config["tie_word_embeddings"] is False and {spec.head_weight, spec.embed_weight} <= stored
        if case_base_tied(name):
            assert [g.result for g in report.merge_run.groups] == ["untied"]
    # the written tied weights, loaded as transformers loads them, reproduce what peft itself computes
    assert report.merge_run.verified_by.startswith("peft ")
    checked = [c for c in report.comparisons if c.stage == "peft"]
    assert {c.tensor for c in checked} == {spec.embed_weight, spec.head_weight}
    assert all(c.rel_diff <= 1e-5 and c.top1_agreement == 1.0 for c in checked), checked
    # every written weight was measured against the adapter's run-time weight; float32 in, float32 out: exact
    measured = [c for c in report.comparisons if c.stage == "merged"]
    assert measured and all(c.max_abs_diff == 0.0 for c in measured), measured
    assert {c.tensor for c in measured} >= set(report.merge_run.merged)
    # the group says whether peft's own merge would be wrong, and that agrees with what peft really does
    if case_base_tied(name):
        peft_wrong = real.adapter_vs_merged_logits > TOL * real.logit_scale
        assert bool(report.merge_run.groups[0].peft_mechanisms) == peft_wrong, report.merge_run.groups


def resave(base: Path, out: Path, *, shard: int | None = None, dtype: torch.dtype | None = None) -> Path:
    model = load(base)
    if dtype is not None:
        model = model.to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kw)
    return out


@pytest.mark.parametrize("case", ["lora_both", "lora_both_tying"])
def test_sharded_base_gives_sharded_output(case: str, adapter_case, tmp_path: Path) -> None:
    base, adapter, real = adapter_case("llama", case)
    sharded = resave(base, tmp_path / "base", shard=4096)  # the 64 x 16 float32 embedding is 4 KiB
    base_files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(base_files) >= 2
    out = tmp_path / "merged"
    merge(adapter, base=sharded, output_dir=out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == base_files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk = {}
    for f in base_files:
        with safe_open(out / f, "pt") as fh:
            on_disk.update(dict.fromkeys(fh.keys(), f))
    assert index["weight_map"] == dict(sorted(on_disk.items()))
    assert index["metadata"]["total_size"] == sum(
        (out / f).stat().st_size - 8 - int.from_bytes((out / f).read_bytes()[:8], "little") for f in base_files
    )
    tied = case == "lora_both_tying"
    assert ("lm_head.weight" in index["weight_map"]) is not tied
    if not tied:  # the untied head is stored next to the embedding it was tied to
        assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    assert_reproduces(out, real.peft_logits, real.logit_scale)
    assert audit(out).exit_code == 0


def test_bin_base_gives_safetensors(adapter_case, tmp_path: Path) -> None:
    base, adapter, real = adapter_case("gpt2", "lora_embed")
    binbase = tmp_path / "base"
    shutil.copytree(base, binbase)
    state = load_file(binbase / "model.safetensors")
    (binbase / "model.safetensors").unlink()
    torch.save(state, binbase / "pytorch_model.bin")
    out = tmp_path / "merged"
    merge(adapter, base=binbase, output_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_reproduces(out, real.peft_logits, real.logit_scale)


def test_bf16_base_stays_bf16(adapter_case, tmp_path: Path) -> None:
    base, adapter, _ = adapter_case("llama", "lora_both_tying")
    bf16 = resave(base, tmp_path / "base", dtype=torch.bfloat16)
    out = tmp_path / "merged"
    report = merge(adapter, base=bf16, output_dir=out)
    with safe_open(out / "model.safetensors", "pt") as fh:
        names = list(fh.keys())
        assert {fh.get_slice(k).get_dtype() for k in names} == {"BF16"}
    measured = [c for c in report.comparisons if c.stage == "merged"]
    assert measured and max(c.rel_diff for c in measured) < 2**-8  # bf16 rounding of the exact float32 merge
    reference = peft_logits(bf16, adapter)  # the adapter on the bf16 base, computed in float32
    assert_reproduces(out, reference, float(reference.abs().max()) * 100)  # within bf16 rounding: 1e-2 x scale
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def _lora(**kw: object) -> object:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kw)


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        # GPT-2's attention projections are Conv1D ([in, out]); c_proj is square, so only the layer type tells
        # that peft transposes the delta (it forces fan_in_fan_out for Conv1D)
        ("gpt2", {"target_modules": ["c_attn", "c_proj", "wte"], "fan_in_fan_out": True}),
        ("gpt2", {"target_modules": ["c_attn"], "modules_to_save": ["c_fc"], "fan_in_fan_out": True}),  # + biases
        (
            "llama",
            {
                "target_modules": ["q_proj", "v_proj", "o_proj", "embed_tokens"],
                "rank_pattern": {"q_proj": 2, "embed_tokens": 6},
                "alpha_pattern": {"v_proj": 16},
                "use_rslora": True,
            },
        ),
        ("opt", {"target_modules": ["q_proj", "k_proj", "fc1", "lm_head"], "rank_pattern": {"fc1": 8}}),
    ],
    ids=["gpt2-conv1d-square", "gpt2-modules_to_save-bias", "llama-patterns-rslora", "opt-patterns-head"],
)
def test_other_layers_merge_as_peft(arch: str, config: dict, adapter_case, tmp_path: Path) -> None:
    base, _, _ = adapter_case(arch, "lora_embed")
    adapter = build_custom_adapter(arch, _lora(**config), base, tmp_path / "adapter")
    out = tmp_path / "merged"
    report = merge(adapter, base=base, output_dir=out)
    assert report.exit_code == 0
    assert_reproduces(out, peft_logits(base, adapter))
    assert report.merge_run.merged  # LoRA layers beyond the tied pair were merged


def _fails(args: list[str], out: Path, needle: str) -> None:
    result = runner.invoke(app, ["merge", *args, "--output-dir", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.tieaudit-tmp-*"))


def test_dora_is_refused(adapter_case, tmp_path: Path) -> None:
    base, _, _ = adapter_case("llama", "lora_embed")
    config = _lora(target_modules=["q_proj", "v_proj"], use_dora=True)
    adapter = build_custom_adapter("llama", config, base, tmp_path / "a")
    _fails([str(adapter), "--base", str(base)], tmp_path / "out", "DoRA")


def test_non_lora_adapter_is_refused(adapter_case, tmp_path: Path) -> None:
    from peft import IA3Config

    base, _, _ = adapter_case("llama", "lora_embed")
    ia3 = IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapter = build_custom_adapter("llama", ia3, base, tmp_path / "ia3")
    _fails([str(adapter), "--base", str(base)], tmp_path / "out", "LoRA adapters only")


def test_adapter_base_mismatch_is_refused(adapter_case, checkpoint, tmp_path: Path) -> None:
    base, adapter, _ = adapter_case("llama", "lora_embed")
    opt_base, _, _ = adapter_case("opt", "lora_embed")
    # modules the base does not have
    _fails([str(adapter), "--base", str(opt_base)], tmp_path / "o1", "which the base does not have")
    # LoRA factors that do not fit the base's weight
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(4, 7)
    save_file(tensors, bad / "adapter_model.safetensors")
    _fails([str(bad), "--base", str(base)], tmp_path / "o2", "do not fit")
    # a base whose own tying is broken
    diverged = checkpoint("llama", "diverged", "safetensors")
    _fails([str(adapter), "--base", str(diverged)], tmp_path / "o3", "fix it first")


def test_usage_errors(adapter_case, tmp_path: Path) -> None:
    base, adapter, _ = adapter_case("llama", "lora_embed")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(adapter), "--base", str(base), "--output-dir", str(out)])
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _fails([str(base), "--base", str(base)], tmp_path / "o1", "not a PEFT adapter")
    _fails([str(adapter), "--base", str(tmp_path / "nowhere")], tmp_path / "o2", "--base")
    lonely = tmp_path / "lonely"
    shutil.copytree(adapter, lonely)
    cfg = json.loads((lonely / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (lonely / "adapter_config.json").write_text(json.dumps(cfg))
    _fails([str(lonely)], tmp_path / "o3", "pass --base")
    result = runner.invoke(app, ["merge", str(adapter), "--base", str(base), "--output-dir", str(adapter / "m")])
    assert result.exit_code == 2 and "outside" in result.stderr and not (adapter / "m").exists()


def test_non_weight_files_are_carried(adapter_case, tmp_path: Path) -> None:
    base0, adapter0, _ = adapter_case("llama", "lora_embed")
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(base0, base)
    shutil.copytree(adapter0, adapter)
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "LICENSE"):
        (base / name).write_text(f"base {name}")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"x" * 16)  # original-format weights: not carried
    out = tmp_path / "m1"
    merge(adapter, base=base, output_dir=out)
    assert (out / "tokenizer.json").read_text() == "base tokenizer.json"
    assert (out / "README.md").exists() and (out / "LICENSE").exists() and not (out / "original").exists()
    # an adapter saved with its tokenizer (e.g. after adding tokens): its tokenizer files win, all of them
    (adapter / "tokenizer_config.json").write_text("adapter tokenizer_config.json")
    (adapter / "special_tokens_map.json").write_text("adapter special_tokens_map.json")
    out2 = tmp_path / "m2"
    report = merge(adapter, base=base, output_dir=out2)
    assert (out2 / "tokenizer_config.json").read_text() == "adapter tokenizer_config.json"
    assert (out2 / "special_tokens_map.json").exists() and not (out2 / "tokenizer.json").exists()
    assert report.exit_code == 0


def test_cli_json_report(adapter_case, tmp_path: Path) -> None:
    base, adapter, _ = adapter_case("llama", "lora_both_tying")
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(adapter), "--base", str(base), "--output-dir", str(out), "-f", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["summary"]["exit_code"] == 0 and doc["target"]["path"] == str(out)
    run = doc["merge_run"]
    assert run["groups"][0]["result"] == "tied"
    assert run["groups"][0]["peft_mechanisms"] == ["double-merge-of-tied-factors"]
    assert "merged once per tied layer" in run["groups"][0]["peft_problem"]
    assert {c["stage"] for c in doc["comparisons"]} >= {"merged"}
    assert "merged" in result.stderr  # the summary line goes to stderr
    text = runner.invoke(app, ["merge", str(adapter), "--base", str(base), "--output-dir", str(tmp_path / "t")])
    assert text.exit_code == 0 and "tied" in text.stdout
    assert "peft's merge_and_unload would get this wrong" in text.stdout


def test_tie102_hint_command_merges(adapter_case, tmp_path: Path) -> None:
    """The fix `tieaudit check` prints for TIE102 is a real command: run as printed, the merge is exact."""
    import shlex

    base, adapter, real = adapter_case("gemma2", "lora_both")
    finding = next(f for f in audit(adapter, base=base).findings if f.code == "TIE102")
    assert finding.fix is not None and finding.fix.command
    argv = shlex.split(finding.fix.command.replace("MERGED_DIR", str(tmp_path / "m")))
    assert argv[:2] == ["tieaudit", "merge"]
    result = runner.invoke(app, argv[1:])
    # exit 1: the exact merge unties Gemma 2, whose head vLLM always ties (TIE005 says so); nothing else
    assert result.exit_code == 1, result.stderr
    assert not alarms_beyond_flag_ignoring_readers(audit(tmp_path / "m").findings)
    assert_reproduces(tmp_path / "m", real.peft_logits, real.logit_scale)


def _cli(
    args: list[str], env: dict[str, str] | None = None, fsize: int | None = None, fault: str | None = None
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``fault``: run it through tests/faultrun.py with that fault."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [
            sys.executable,
            *([str(ROOT / "tests" / "faultrun.py"), fault] if fault else ["-m", "tieaudit"]),
            "merge",
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        preexec_fn=limit,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("point", ["staged", "weights", "index", "config", "peft-checked", "verified"])
def test_sigkill_leaves_nothing_half_written(point: str, adapter_case, tmp_path: Path) -> None:
    base, adapter, real = adapter_case("llama", "lora_both")
    out = tmp_path / "merged"
    args = [str(adapter), "--base", str(base), "--output-dir", str(out)]
    proc = _cli(args, fault=point)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()  # the switch is one rename: before it, the output does not exist
    assert list(tmp_path.glob(".merged.tieaudit-tmp-*"))  # the dead run's staging directory, clearly named
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob(".merged.tieaudit-tmp-*"))  # removed by the next run
    assert_reproduces(out, real.peft_logits, real.logit_scale)


def test_full_disk_writes_nothing(adapter_case, tmp_path: Path) -> None:
    base, adapter, _ = adapter_case("llama", "lora_both")
    out = tmp_path / "merged"
    proc = _cli([str(adapter), "--base", str(base), "--output-dir", str(out)], fsize=2048)
    assert proc.returncode == 2 and "cannot write the merged model" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged.tieaudit-tmp-*"))


def test_base_bytes_read_are_bounded(adapter_case, tmp_path: Path) -> None:
    """What merge reads of the base, exactly: every tensor once to write it (the untied head is written from the
    embedding, a second read), the embedding once per `base_layer` copy the adapter carries (checked against
    the base), and once for peft's own run of the tied layers. Never the model a second time: the decision to keep or
    untie the pair reads only adapter tensors."""
    from tieaudit.checkpoint import open_checkpoint

    base, adapter, _ = adapter_case("llama", "lora_both")
    with open_checkpoint(base) as ckpt:
        total = sum(i.nbytes for i in ckpt.tensors.values())
        embed = ckpt.tensors["model.embed_tokens.weight"].nbytes
    copies = sum(1 for k in load_file(adapter / "adapter_model.safetensors") if k.endswith("base_layer.weight"))
    assert copies == 2
    report = merge(adapter, base=base, output_dir=tmp_path / "m")
    assert report.merge_run is not None
    assert report.merge_run.bytes_written >= total
    assert report.merge_run.base_bytes_read == total + embed * (1 + copies + 1)


# -- cases found in review: each is checked against what peft really does (fixtures.adapter_builders.reality) ----


@pytest.mark.parametrize(
    "config",
    [
        # trainable tokens on the head only: peft wraps the head alone, the embedding keeps W0
        {"target_modules": ["q_proj", "v_proj"], "trainable_token_indices": {"lm_head": [5, 7]}},
        # different indices on each side, no ensure_weight_tying: each side keeps its own rows
        {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [5, 7], "lm_head": [9, 11]}},
        # the same indices on both: peft ties the head to the embedding's token adapter
        {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [5, 7], "lm_head": [5, 7]}},
        # ensure_weight_tying with a rank pattern on the embedding only: the head gets the embedding's rank-6
        # factors but keeps its configured r=4, so its scaling (alpha/4) differs from the embedding's (alpha/6)
        {
            "target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"],
            "rank_pattern": {"embed_tokens": 6},
            "ensure_weight_tying": True,
        },
    ],
    ids=["tokens-head-only", "tokens-different-indices", "tokens-same-indices", "tying-rank-pattern"],
)
def test_review_cases_match_peft(config: dict, adapter_case, tmp_path: Path) -> None:
    from fixtures.adapter_builders import reality

    base, _, _ = adapter_case("llama", "lora_embed")
    adapter = build_custom_adapter("llama", _lora(**config), base, tmp_path / "adapter")
    real = reality(base, adapter)
    # tieaudit check's verdicts agree with peft
    codes = {f.code for f in audit(adapter, base=base).findings}
    assert ("TIE101" in codes) == (real.runtime_embed_vs_head > RUNTIME_TOL), (codes, real.runtime_embed_vs_head)
    assert ("TIE102" in codes) == (real.adapter_vs_merged_logits > TOL * real.logit_scale), codes
    # and the merge reproduces the adapter, tied exactly when the adapter keeps the pair equal
    out = tmp_path / "merged"
    report = merge(adapter, base=base, output_dir=out)
    assert_reproduces(out, real.peft_logits, real.logit_scale)
    tied = json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    assert tied is (real.runtime_embed_vs_head <= RUNTIME_TOL), report.merge_run.groups


def test_lora_variants_are_refused(adapter_case, tmp_path: Path) -> None:
    base, _, _ = adapter_case("llama", "lora_embed")
    adapter = build_custom_adapter(
        "llama",
        _lora(target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM"),
        base,
        tmp_path / "a",
    )
    _fails([str(adapter), "--base", str(base)], tmp_path / "out", "aLoRA")


def test_base_copy_of_any_layer_must_match_the_base(adapter_case, tmp_path: Path) -> None:
    """peft loads every saved `base_layer.weight` over the base's weight, tied or not: one that differs from the
    base means another base, and the merge is refused."""
    base, adapter0, _ = adapter_case("llama", "lora_embed")
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter0, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    base_q = load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    tensors[key] = base_q.clone()
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert merge(adapter, base=base, output_dir=tmp_path / "same").exit_code == 0  # the base's own values: fine
    tensors[key] = base_q + 0.1
    save_file(tensors, adapter / "adapter_model.safetensors")
    _fails([str(adapter), "--base", str(base)], tmp_path / "other", "trained on another base")


def test_refused_merge_creates_no_directories(adapter_case, tmp_path: Path) -> None:
    base, _, _ = adapter_case("llama", "lora_embed")
    adapter = build_custom_adapter("llama", _lora(target_modules=["q_proj"], use_dora=True), base, tmp_path / "a")
    out = tmp_path / "deep" / "a" / "b" / "out"
    _fails([str(adapter), "--base", str(base)], out, "DoRA")
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("case", ["lora_both", "trainable_tokens", "mts_embed"])
def test_a_wrong_internal_model_is_stopped_by_peft(
    case: str, adapter_case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tieaudit's own model of peft made wrong on purpose (LoRA deltas scaled twice, trainable-token rows not
    applied, modules_to_save copies ignored): the merge's internal checks agree with the wrong model, so only peft
    itself can tell. The commit is stopped: exit 2, nothing written, one line naming the tensor."""
    import tieaudit.adapter.forecast as forecast
    import tieaudit.repair.merge as merging

    if case == "lora_both":
        original = forecast.DeltaRows.__init__

        def doubled(self, lora, adapter, *, transposed=False):
            original(self, lora, adapter, transposed=transposed)
            self.s *= 2

        monkeypatch.setattr(forecast.DeltaRows, "__init__", doubled)
    elif case == "trainable_tokens":
        for module in (forecast, merging):  # wherever the merge's model of peft applies token rows
            monkeypatch.setattr(module, "apply_tokens", lambda rows, start, stop, tokens: rows)
    else:
        plan = merging.adapter_edits

        def no_copies(*args, **kwargs):
            from dataclasses import replace

            return {k: replace(e, full_copy=None) for k, e in plan(*args, **kwargs).items()}

        monkeypatch.setattr(merging, "adapter_edits", no_copies)
    base, adapter, _ = adapter_case("llama", case)
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(adapter), "--base", str(base), "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert (
        "merge refused" in line and "does not reproduce the adapter as peft" in line and "nothing was written" in line
    )
    assert not out.exists() and not list(tmp_path.glob(".merged.tieaudit-tmp-*"))


def test_merge_refuses_when_peft_cannot_be_asked(adapter_case, tmp_path: Path) -> None:
    """Over the peft check's memory bound the merge cannot be verified: exit 2, nothing written, the bound named."""
    base, adapter, _ = adapter_case("llama", "lora_both")
    out = tmp_path / "merged"
    args = ["merge", str(adapter), "--base", str(base), "--output-dir", str(out)]
    result = runner.invoke(app, [*args, "--peft-max-memory", "0.000001"])
    assert result.exit_code == 2 and "cannot verify the merge against peft" in result.stderr, result.output
    assert "--peft-max-memory" in result.stderr and not out.exists()
    bad = runner.invoke(app, [*args, "--peft-max-memory", "-1"])
    assert bad.exit_code == 2 and "positive number of GiB" in bad.stderr and not out.exists()


@pytest.mark.parametrize("tokens", [{"embed_tokens": [5, 7]}, [5, 7]], ids=["dict", "list"])
def test_tokens_on_the_embedding_and_lora_on_the_head(tokens, adapter_case, tmp_path: Path) -> None:
    """Trainable tokens on the embedding of a tied Llama and LoRA on lm_head: peft ties the head to the embedding's
    token adapter and runs the head's LoRA on top of the token-replaced rows (the token rows get ΔH too). The merge
    reproduces that (it once wrote the token rows without ΔH: logits off by 0.69, exit 0), and check reports that the
    adapter unties the pair and that peft's own merge breaks it (peft's merge_and_unload -> save_pretrained raises)."""
    base, _, _ = adapter_case("llama", "lora_embed")
    config = _lora(target_modules=["q_proj", "v_proj", "lm_head"], trainable_token_indices=tokens)
    adapter = build_custom_adapter("llama", config, base, tmp_path / "adapter")
    reference = peft_logits(base, adapter)
    out = tmp_path / "merged"
    report = merge(adapter, base=base, output_dir=out)
    assert report.exit_code == 0 and report.merge_run.verified_by.startswith("peft ")
    assert [g.result for g in report.merge_run.groups] == ["untied"]
    assert_reproduces(out, reference)
    assert {f.code for f in audit(adapter, base=base).findings} >= {"TIE101", "TIE102"}


def test_adapter_saved_after_a_vocabulary_resize(adapter_case, tmp_path: Path) -> None:
    """modules_to_save on both tied layers of a resized model: peft also writes the wrappers' parts under its own
    names (`X.modules_to_save.weight`, `X.original_module.weight`). On the resized base the merge reproduces the
    adapter; on the base before the resize it is refused for the shapes (it once named the wrappers' parts as
    modules the base does not have, in both cases)."""
    from peft import LoraConfig, get_peft_model

    from fixtures.adapter_builders import _load, randomize

    base, _, _ = adapter_case("llama", "lora_embed")
    model = _load(base)
    model.resize_token_embeddings(72, mean_resizing=False)
    resized = tmp_path / "resized"
    model.save_pretrained(resized)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    randomize(peft_model, 0)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    keys = stored_names(adapter)
    assert {
        "base_model.model.lm_head.modules_to_save.weight",
        "base_model.model.lm_head.original_module.weight",
    } <= keys
    out = tmp_path / "merged"
    report = merge(adapter, base=resized, output_dir=out)
    assert report.exit_code == 0 and report.merge_run.verified_by
    assert_reproduces(out, peft_logits(resized, adapter))
    result = runner.invoke(app, ["merge", str(adapter), "--base", str(base), "--output-dir", str(tmp_path / "m2")])
    assert result.exit_code == 2 and "has shape [72, 16], the base's lm_head.weight [64, 16]" in result.stderr
    codes = [f.code for f in audit(adapter, base=base).findings]
    assert codes.count("TIE104") == 2
