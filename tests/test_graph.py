"""The tie graph beyond the verdict matrix: composite configs, unknown architectures, observed ties,
index disagreements, and what is read from disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tieaudit import audit
from tieaudit.model import TieStatus
from tieaudit.ties.compare import diff_tensors, probe_hidden_states, rows_per_chunk


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_gemma3_composite_flag_conflict_and_legacy_names(checkpoint) -> None:
    """Top-level flag false (governs), text_config true: transformers unties, accelerate reads text_config."""
    report = audit(checkpoint("gemma3", "untied_missing", "safetensors"))
    codes = {f.code for f in report.findings}
    assert {"TIE002", "TIE005"} <= codes
    conflict = next(f for f in report.findings if f.code == "TIE005")
    assert conflict.location.config_key == "/text_config/tie_word_embeddings"
    assert conflict.location.line and conflict.location.line > 1
    [group] = report.groups
    assert group.source == "model.language_model.embed_tokens.weight"
    assert group.disk_names[group.source] == "language_model.model.embed_tokens.weight"


def test_t5_forced_flag_is_a_conflict_not_an_error(checkpoint) -> None:
    report = audit(checkpoint("t5", "untied_missing", "safetensors"))
    [finding] = report.findings
    assert finding.code == "TIE005" and "forces" in finding.message
    [group] = report.groups
    assert group.status is TieStatus.TIED and len(group.targets) == 3


def test_unknown_architecture_falls_back_to_observed_ties(tmp_path: Path) -> None:
    """A remote-code model: never run; ties recorded by safetensors' save_model metadata are still shown."""
    from safetensors.torch import save_model
    from transformers import LlamaForCausalLM

    from fixtures.builders import ARCHS

    cfg = ARCHS["llama"].make_config()
    model = LlamaForCausalLM(cfg)
    target = tmp_path / "remote"
    target.mkdir()
    save_model(model, str(target / "model.safetensors"))  # writes {removed: kept} metadata
    data = json.loads(cfg.to_json_string())
    data["architectures"] = ["MyCustomForCausalLM"]
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"}
    (target / "config.json").write_text(json.dumps(data, indent=2))
    (target / "modeling_custom.py").write_text("raise SystemExit('remote code must never run')\n")

    report = audit(target)
    assert any(s.check == "declared-ties" and "remote code" in s.reason for s in report.skipped)
    [group] = report.groups
    assert not group.declared and "safetensors-metadata" in group.observed
    assert group.status is TieStatus.TIED
    assert report.exit_code == 0


def test_index_disagreeing_with_shards_is_a_conflict(checkpoint, tmp_path: Path) -> None:
    ckpt = _copy(checkpoint("llama", "redundant", "safetensors-sharded"), tmp_path)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    real = index["weight_map"]["lm_head.weight"]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != real)
    index["weight_map"]["lm_head.weight"] = other
    index_path.write_text(json.dumps(index, indent=2))
    report = audit(ckpt)
    conflict = [f for f in report.findings if f.code == "TIE005"]
    assert conflict and conflict[0].location.file == "model.safetensors.index.json"
    assert "lm_head.weight" in conflict[0].message and other in conflict[0].message


@pytest.mark.parametrize(("arch", "variant"), [("llama", "clean"), ("mistral", "clean"), ("gpt2", "untied_missing")])
def test_structural_verdicts_read_no_tensor_data(arch: str, variant: str, checkpoint) -> None:
    """Nothing to compare (one side stored, or untied): headers only."""
    report = audit(checkpoint(arch, variant, "safetensors-sharded"))
    assert report.stats.tensor_bytes_read == 0
    assert report.stats.header_bytes_read > 0


def test_pair_comparison_reads_each_tensor_once_without_probes(checkpoint) -> None:
    path = checkpoint("llama", "diverged", "safetensors")
    report = audit(path, probe_tokens=0)
    pair_bytes = 2 * 64 * 16 * 4  # embed + lm_head, float32
    assert report.stats.tensor_bytes_read == pair_bytes
    with_probes = audit(path, probe_tokens=8)
    assert with_probes.stats.tensor_bytes_read == pair_bytes  # the logits come from the same pass
    [cmp] = with_probes.comparisons
    assert cmp.stage == "on-disk" and cmp.max_abs_diff == pytest.approx(0.05, rel=1e-3)
    assert 0.0 <= cmp.top1_agreement <= 1.0 and cmp.max_abs_logit_diff > 0


def test_comparison_memory_is_bounded_by_chunks() -> None:
    """Whatever the vocabulary, one read is at most one chunk."""
    shape = (1000, 64)
    a = torch.randn(shape)
    b = a.clone()
    b[997] += 1
    largest = 0

    def reader(t: torch.Tensor):
        def read(start: int, stop: int) -> torch.Tensor:
            nonlocal largest
            largest = max(largest, (stop - start) * shape[1] * 4)
            return t[start:stop]

        return read

    chunk = 4096
    d = diff_tensors(reader(a), reader(b), shape, probes=4, chunk_bytes=chunk)
    assert largest <= chunk and rows_per_chunk(shape, chunk) == 16
    assert not d.bitwise_equal and d.max_abs_diff == pytest.approx(1.0)
    # equal at first, different at row 997: a second pass computes the logits, and they agree with a direct computation
    h = probe_hidden_states(4, 64)
    direct = ((h @ a.T) - (h @ b.T)).abs().max()
    assert d.max_abs_logit_diff == pytest.approx(float(direct), rel=1e-5)
    top1 = float(((h @ a.T).argmax(1) == (h @ b.T).argmax(1)).float().mean())
    assert d.top1_agreement == top1


def test_single_pass_logits_match_a_direct_computation() -> None:
    torch.manual_seed(1)
    a = torch.randn(300, 32)
    b = a + 0.3 * torch.randn(300, 32)
    d = diff_tensors(lambda s, e: a[s:e], lambda s, e: b[s:e], (300, 32), probes=16, chunk_bytes=1024)
    h = probe_hidden_states(16, 32)
    assert d.max_abs_logit_diff == pytest.approx(float(((h @ a.T) - (h @ b.T)).abs().max()), rel=1e-5)
    assert d.top1_agreement == float(((h @ a.T).argmax(1) == (h @ b.T).argmax(1)).float().mean())
    assert d.rel_diff == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-5)


def test_nan_is_never_equal_like_torch_equal() -> None:
    """transformers ties only when torch.equal holds: NaN != NaN."""
    a = torch.tensor([[float("nan"), 1.0]])
    d = diff_tensors(lambda s, e: a[s:e], lambda s, e: a.clone()[s:e], (1, 2))
    assert not d.bitwise_equal


def test_bin_shared_storage_is_observed_and_not_redundant(checkpoint) -> None:
    report = audit(checkpoint("llama", "clean", "bin"))
    [group] = report.groups
    assert "shared-storage" in group.observed
    assert report.findings == ()
    assert report.stats.tensor_bytes_read == 0  # one storage under two names: equal without reading


@pytest.mark.parametrize(("variant", "code"), [("untied_missing", "TIE002"), ("diverged", "TIE001")])
def test_config_without_architectures_uses_the_auto_head_class(variant: str, code: str, checkpoint, outcome, tmp_path):
    """AutoModelForCausalLM picks the class from model_type; so does tieaudit."""
    ckpt = _copy(checkpoint("llama", variant, "safetensors"), tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["architectures"]
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    report = audit(ckpt)
    assert report.target.architecture == "LlamaForCausalLM"
    assert code in {f.code for f in report.findings}
    assert outcome(ckpt, "llama").broken


def test_mixed_dtypes_are_compared_as_transformers_loads_them(checkpoint, outcome, tmp_path: Path) -> None:
    """bf16 embedding and an f32 head with the same values: transformers casts, finds them equal, ties."""
    from safetensors.torch import load_file, save_file

    ckpt = _copy(checkpoint("llama", "redundant", "safetensors"), tmp_path)
    state = load_file(ckpt / "model.safetensors")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.bfloat16)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].to(torch.float32)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert not outcome(ckpt, "llama").broken
    assert {f.code for f in audit(ckpt).findings} == {"TIE006"}
    # and with different values in different dtypes: not tied, TIE001 says in which dtype it compared
    state["lm_head.weight"] = state["lm_head.weight"] + 0.5
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    [finding] = audit(ckpt).findings
    assert finding.code == "TIE001" and "compared in" in finding.message


def test_inf_is_reported_as_inf() -> None:
    a = torch.zeros(2, 2)
    b = a.clone()
    b[0, 0] = float("inf")
    d = diff_tensors(lambda s, e: a[s:e], lambda s, e: b[s:e], (2, 2))
    assert d.max_abs_diff == float("inf")
