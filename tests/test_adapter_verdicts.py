"""The adapter correctness bar: tieaudit's forecast agrees with what peft really does.

Every case of ground-truth.md §3 is built with real peft calls (non-zero deltas) on Llama, Gemma 2,
GPT-2 (`wte`) and OPT (`model.decoder.embed_tokens`); peft's real merge_and_unload -> save_pretrained ->
from_pretrained is run (fixtures/adapter_builders.reality); and tieaudit, reading only the files, must
(a) report TIE102 exactly when the real reloaded logits differ from the adapter's, (b) forecast the
merge-reload weight difference of each tied tensor within 2 % of the real one, (c) report TIE101 exactly
when the adapter's effective embedding and head differ while the base ties them, and (d) stay clean for
adapters that keep tying consistent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures.adapter_builders import ADAPTER_ARCHS, ADAPTER_CASES, case_base_tied
from tieaudit import audit
from tieaudit.cli.app import app
from tieaudit.model import Severity

CASES = [(a, c) for a in ADAPTER_ARCHS for c in ADAPTER_CASES]
RUNTIME_TOL = 1e-5  # effective embedding vs head, max abs (float32 noise is ~1e-7)


def _audit(adapter_case, arch: str, case: str, **kw):
    base, adapter, real = adapter_case(arch, case)
    return audit(adapter, base=base, **kw), real


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_forecast_matches_peft(case: tuple[str, str], adapter_case, monkeypatch) -> None:
    arch, name = case
    shipped, real = _audit(adapter_case, arch, name)  # the default: peft's recorded runs where they cover the shape
    monkeypatch.setenv("TIEAUDIT_NO_TABLE", "1")
    report, _ = _audit(adapter_case, arch, name)  # peft run here
    monkeypatch.delenv("TIEAUDIT_NO_TABLE")
    codes = {f.code for f in report.findings}
    # the shipped table changes how peft was asked, nothing else
    assert [(f.code, f.message) for f in shipped.findings] == [(f.code, f.message) for f in report.findings]
    assert [c for c in shipped.comparisons if not c.stage.startswith("peft-")] == [
        c for c in report.comparisons if not c.stage.startswith("peft-")
    ]
    for f in shipped.findings:
        peft = (f.evidence or {}).get("peft")
        assert peft is None or peft["agrees"] is True or peft["by"] == "run", peft

    # (a) TIE102 <=> the real merged model's logits differ from the adapter's
    merge_breaks = real.adapter_vs_merged_logits > 1e-4 * real.logit_scale
    assert ("TIE102" in codes) == merge_breaks, (real.adapter_vs_merged_logits, real.logit_scale, report.findings)

    # (c) TIE101 <=> a tied base, and the adapter's effective embedding and head differ at run time
    unties = case_base_tied(name) and real.runtime_embed_vs_head > RUNTIME_TOL
    assert ("TIE101" in codes) == unties, (real.runtime_embed_vs_head, report.findings)

    # (b) the forecast merge-reload difference of each tied tensor is the real one, within 2 %
    if case_base_tied(name):
        [group] = report.groups
        forecast = {c.tensor: c.max_abs_diff for c in report.comparisons if c.stage == "merge-reload"}
        actual = {
            group.source: float((real.merged_embed - real.runtime_embed).abs().max()),
            group.targets[0]: float((real.merged_head - real.runtime_head).abs().max()),
        }
        for tensor, value in actual.items():
            assert tensor in forecast, report.comparisons
            assert forecast[tensor] == pytest.approx(value, rel=0.02, abs=1e-5), (tensor, forecast, actual)
        runtime = next(c for c in report.comparisons if c.stage == "adapter")
        assert runtime.max_abs_diff == pytest.approx(real.runtime_embed_vs_head, rel=0.02, abs=1e-5)

    # (e) peft itself was asked about the tied group, and tieaudit's forecast agrees with it (verdicts, and probe
    # logits within 2 %): the numbers printed are ones peft stands behind
    if case_base_tied(name):
        assert not [s for s in report.skipped if s.check == "peft-confirmation"], report.skipped
        peft_stages = {c.stage for c in report.comparisons if c.stage.startswith("peft-")}
        assert peft_stages == {"peft-adapter", "peft-merge-reload"}, report.comparisons
        for f in report.findings:
            if f.code in ("TIE101", "TIE102"):
                assert f.evidence["peft"]["agrees"] is True, f.evidence["peft"]
        ours = {(c.stage, c.tensor): c.max_abs_logit_diff for c in report.comparisons}
        for (stage, tensor), value in list(ours.items()):
            if stage in ("adapter", "merge-reload"):
                theirs = ours[(f"peft-{stage}", tensor)]
                if theirs is None:  # peft's reload drops the tensor: the forecast says so too
                    assert value is None
                else:
                    assert value == pytest.approx(theirs, rel=0.02, abs=1e-5), (stage, tensor, value, theirs)

    # (d) consistent adapters are clean, and nothing but the adapter rules fires
    if not merge_breaks and not unties:
        assert not [f for f in report.findings if f.code in ("TIE101", "TIE102", "TIE104")]
    assert all(f.code.startswith("TIE1") for f in report.findings)
    assert report.target.kind == "adapter"


def test_tie102_evidence_names_the_mechanism_and_points_to_merge(adapter_case) -> None:
    report, _ = _audit(adapter_case, "llama", "lora_both_tying")
    [finding] = [f for f in report.findings if f.code == "TIE102"]
    assert finding.evidence["mechanisms"] == ["double-merge-of-tied-factors"]
    assert "W0 + 2ΔE" in finding.message
    assert finding.fix is not None and finding.fix.command and finding.fix.command.startswith("tieaudit merge ")
    assert finding.location.file == "adapter_config.json" and finding.location.line


def test_tie101_says_what_the_adapted_model_does(adapter_case) -> None:
    report, _ = _audit(adapter_case, "opt", "mts_embed")
    [finding] = [f for f in report.findings if f.code == "TIE101"]
    assert "trained copy (modules_to_save)" in finding.message and "keeps the base weights" in finding.message
    assert "model.decoder.embed_tokens" in finding.message


def test_gpt2_tied_head_lora_is_ignored_on_reload(adapter_case) -> None:
    """peft re-ties the head only for layers named embed_tokens: GPT-2's wte adapter loses its head LoRA."""
    report, real = _audit(adapter_case, "gpt2", "lora_both_tying")
    assert any("lm_head" in k for k in real.ignored_adapter_keys)
    assert "TIE103" in {f.code for f in report.findings}


def test_tie103_on_an_untied_base(adapter_case, tmp_path: Path) -> None:
    """An ensure_weight_tying adapter trained on the tied base, applied to an untied one."""
    _, adapter, _ = adapter_case("llama", "lora_both_tying")
    untied_base, _, _ = adapter_case("llama", "untied_base_lora_both")
    report = audit(adapter, base=untied_base)
    ignored = [f for f in report.findings if f.code == "TIE103"]
    assert ignored and ignored[0].location.tensor == "lm_head.weight"


def test_tie104_base_copy_differs(adapter_case, tmp_path: Path) -> None:
    """The adapter was trained on another base (here: the embedding fine-tuned since): its saved
    base_layer copy does not match the base it is checked against."""
    import torch
    from safetensors.torch import load_file, save_file

    base, adapter, _ = adapter_case("llama", "lora_embed")
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    state = load_file(other / "model.safetensors")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] + 0.01 * torch.randn(64, 16)
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    report = audit(adapter, base=other)
    [mismatch] = [f for f in report.findings if f.code == "TIE104"]
    assert mismatch.location.tensor == "model.embed_tokens.weight"
    assert mismatch.evidence["max_abs_diff"] > 0.001
    assert report.exit_code == 1


def test_tie104_shapes_do_not_fit(adapter_case, tmp_path: Path) -> None:
    """A base with a larger vocabulary: the adapter's factors and copies do not fit; an error, no traceback."""
    from safetensors.torch import load_file, save_file

    base, adapter, _ = adapter_case("llama", "lora_embed")
    bigger = tmp_path / "bigger"
    shutil.copytree(base, bigger)
    state = load_file(bigger / "model.safetensors")
    import torch

    state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"], torch.zeros(8, 16)])
    save_file(state, bigger / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((bigger / "config.json").read_text())
    cfg["vocab_size"] = 72
    (bigger / "config.json").write_text(json.dumps(cfg))
    report = audit(adapter, base=bigger)
    [mismatch] = [f for f in report.findings if f.code == "TIE104"]
    assert "do not fit" in mismatch.message
    assert not [f for f in report.findings if f.code == "TIE102"]  # no forecast on a base it does not fit


runner = CliRunner()


def _lonely(adapter: Path, tmp_path: Path, base_name: str | None) -> Path:
    lonely = tmp_path / "adapter"
    shutil.copytree(adapter, lonely)
    cfg = json.loads((lonely / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (lonely / "adapter_config.json").write_text(json.dumps(cfg))
    return lonely


@pytest.mark.parametrize("base_name", ["some-org/not-in-the-cache", "../no-such-directory", None])
def test_a_base_that_cannot_be_found_fails_the_check(adapter_case, tmp_path: Path, base_name: str | None) -> None:
    """issue 18.1: a Hub id not in the cache, a missing directory or no base at all used to pass with exit 0.
    Now TIE106 (error) says what was not checked, names the class from auto_mapping and the tied layers the
    adapter changes; --no-base (require_base=False) turns it into info for users who want the adapter alone."""
    _, adapter, _ = adapter_case("llama", "lora_embed")
    lonely = _lonely(adapter, tmp_path, base_name)
    report = audit(lonely)
    [finding] = report.findings
    assert finding.code == "TIE106" and finding.severity is Severity.ERROR and report.exit_code == 1
    assert report.target.architecture == "LlamaForCausalLM"
    assert finding.evidence["touched"] == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert "TIE101-TIE105 did not run" in finding.message and "--base" in finding.message
    reasons = " ".join(s.reason for s in report.skipped)
    assert "merge forecast" in reasons
    alone = audit(lonely, require_base=False)
    [info] = alone.findings
    assert info.code == "TIE106" and info.severity is Severity.INFO and alone.exit_code == 0
    cli = runner.invoke(app, ["check", str(lonely)])
    assert cli.exit_code == 1 and "TIE106" in cli.stdout and "unknown architecture" not in cli.stdout
    assert runner.invoke(app, ["check", str(lonely), "--no-base"]).exit_code == 0


def test_without_base_an_adapter_on_untied_layers_says_so(adapter_case, tmp_path: Path) -> None:
    """A LoRA on attention projections only: TIE106 still fails the check (nothing was verified on the base), and
    says the adapter changes no layer the class ties."""
    _, adapter, _ = adapter_case("llama", "lora_embed")
    lonely = _lonely(adapter, tmp_path, "../gone")
    for path in lonely.glob("adapter_model.safetensors"):
        from safetensors.torch import load_file, save_file

        kept = {k: v for k, v in load_file(path).items() if "embed_tokens" not in k and "lm_head" not in k}
        save_file(kept or {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1, 1)}, path)
    [finding] = audit(lonely).findings
    assert finding.code == "TIE106" and "changes no layer that LlamaForCausalLM ties" in finding.message


def test_base_model_name_or_path_resolves_a_local_directory(adapter_case, tmp_path: Path) -> None:
    base, adapter, _ = adapter_case("llama", "lora_head")
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    report = audit(copy)
    assert report.target.base == str(base) and "TIE102" in {f.code for f in report.findings}


def test_deep_measures_the_real_merge(adapter_case) -> None:
    report, real = _audit(adapter_case, "llama", "lora_embed", deep=True)
    [measured] = [c for c in report.comparisons if c.stage == "measured-merge-reload"]
    assert measured.max_abs_logit_diff == pytest.approx(real.adapter_vs_merged_logits, rel=0.05)
    [finding] = [f for f in report.findings if f.code == "TIE102"]
    assert "Measured with peft" in finding.message


def test_merge_forecast_reads_rows_not_models(adapter_case) -> None:
    """The forecast reads the base's one stored tied tensor and the adapter's small factors."""
    report, _ = _audit(adapter_case, "llama", "lora_embed", probe_tokens=0)
    assert report.stats.tensor_bytes_read < 10 * 64 * 16 * 4


def test_cli_on_an_adapter(adapter_case) -> None:
    from typer.testing import CliRunner

    from tieaudit.cli.app import app

    base, adapter, _ = adapter_case("llama", "lora_head")
    result = CliRunner().invoke(app, ["check", str(adapter), "--base", str(base), "-f", "json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == doc["summary"]["exit_code"] == 1
    assert doc["target"]["kind"] == "adapter" and doc["target"]["base"] == str(base)
    # confirmed by peft's recorded run (the shipped peft table): no peft stages of its own
    assert {c["stage"] for c in doc["comparisons"]} == {"adapter", "merge-reload"}
    assert {f["evidence"]["peft"]["by"] for f in doc["findings"]} == {"recorded"}
    assert {f["code"] for f in doc["findings"]} == {"TIE101", "TIE102"}
    wrong = CliRunner().invoke(app, ["check", str(base), "--base", str(base)])
    assert wrong.exit_code == 2 and "--base is for adapters" in wrong.stderr
    missing = CliRunner().invoke(app, ["check", str(adapter), "--base", "/no/such/base"])
    assert missing.exit_code == 2 and "--base" in missing.stderr


def test_bin_adapter_gives_the_same_verdict(adapter_case, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    base, adapter, _ = adapter_case("opt", "lora_embed")
    as_bin = tmp_path / "adapter-bin"
    as_bin.mkdir()
    shutil.copy(adapter / "adapter_config.json", as_bin)
    torch.save(load_file(adapter / "adapter_model.safetensors"), as_bin / "adapter_model.bin")
    codes = {f.code for f in audit(as_bin, base=base).findings}
    assert codes == {f.code for f in audit(adapter, base=base).findings} == {"TIE101", "TIE102"}


def test_base_resolved_offline_from_the_hugging_face_cache(adapter_case, tmp_path: Path, monkeypatch) -> None:
    """base_model_name_or_path as a repo id that is already in the local cache (never downloaded)."""
    import huggingface_hub.constants as hub_constants

    base, adapter, _ = adapter_case("llama", "lora_head")
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-llama"
    shutil.copytree(base, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someorg/tiny-llama"
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    report = audit(copy)
    assert report.target.base is not None and "0123abcd" in report.target.base
    assert "TIE102" in {f.code for f in report.findings}


def test_without_base_an_ensure_weight_tying_adapter_says_what_merging_it_does(tmp_path: Path) -> None:
    """The demo adapter (ensure_weight_tying, factors on embed_tokens and lm_head) without its base: TIE106 says the
    peft merge on a tied base adds the delta twice, which TIE102 confirms once the base is given."""
    demo = Path(__file__).resolve().parents[1] / "fixtures" / "demo"
    lonely = _lonely(demo / "llama-lora-tied", tmp_path, "someorg/not-cached")
    [finding] = audit(lonely).findings
    assert finding.code == "TIE106" and "adds the delta twice (TIE102)" in finding.message
    with_base = audit(lonely, base=demo / "llama-clean")
    assert "TIE102" in {f.code for f in with_base.findings} and "TIE106" not in {f.code for f in with_base.findings}


def test_the_forecast_reads_each_stored_byte_once(adapter_case) -> None:
    """An adapter that saved a copy of the tied embedding (`base_layer`): the base embedding is read once, by the
    forecast's pass, and the copy is compared with it as its rows go by (adapter/analysis.py, CopyCheck); the
    adapter's tensors of the tied layer (copy and factors) are read once too, and nothing else."""
    from tieaudit.checkpoint import open_checkpoint

    base, adapter, _ = adapter_case("llama", "lora_embed")
    with open_checkpoint(adapter) as ad, open_checkpoint(base) as b:
        assert any(name.endswith("base_layer.weight") for name in ad.tensors), "the case must save a base copy"
        adapter_bytes = sum(t.nbytes for name, t in ad.tensors.items() if "embed_tokens" in name)
        embedding = b.tensors["model.embed_tokens.weight"].nbytes
    report = audit(adapter, base=base, peft_check=False)
    assert report.stats.tensor_bytes_read == embedding + adapter_bytes
