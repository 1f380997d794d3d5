"""`check` holds its adapter verdicts to peft itself (tieaudit.adapter_confirm): adapter types and variants tieaudit
does not model (LoKr, DoRA) are judged by running peft on the tied layers, and agree with what the real libraries do
end to end (the whole model loaded with transformers and peft, merged, saved and reloaded); with --no-peft-check they
are TIE105, never a silent pass."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch

from fixtures.adapter_builders import ADAPTER_SPECS, _load, _probe_weight, build_base, build_custom_adapter, probe_ids
from tieaudit import audit

TOL = 1e-4  # x the logit scale


def _variant(name: str) -> tuple[str, object]:
    from peft import LoKrConfig, LoraConfig

    return {
        "lokr-mts-embed": (
            "llama",
            LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
        ),
        "lokr-head": ("llama", LoKrConfig(r=4, target_modules=["q_proj", "lm_head"])),
        "dora-head": ("llama", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "lm_head"])),
        "dora-embed-gemma2": (
            "gemma2",
            LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "embed_tokens"]),
        ),
    }[name]


VARIANTS = ["lokr-mts-embed", "lokr-head", "dora-head", "dora-embed-gemma2"]


def truth(arch: str, base: Path, adapter: Path) -> tuple[bool, bool]:
    """(the adapted model unties the pair at run time, peft's merge -> save -> reload changes the logits), measured
    on whole models with the real libraries, through each layer's forward."""
    from peft import PeftModel

    spec = ADAPTER_SPECS[arch]
    model = PeftModel.from_pretrained(_load(base), str(adapter)).eval()
    inner = model.get_base_model()
    vocab, hidden = inner.get_input_embeddings().weight.shape
    emb = _probe_weight(inner.get_submodule(spec.embed), "embed", vocab, hidden)
    head = _probe_weight(inner.get_submodule(spec.head), "head", vocab, hidden)
    unties = float((emb - head).abs().max()) > 1e-5
    ids = probe_ids(vocab)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    try:
        merged = model.merge_and_unload()
        with tempfile.TemporaryDirectory() as tmp:
            merged.save_pretrained(tmp)
            with torch.no_grad():
                after = _load(Path(tmp))(input_ids=ids).logits
        breaks = float((after - before).abs().max()) > TOL * float(before.abs().max())
    except Exception:  # peft's merge path itself fails: the merged model cannot be had
        breaks = True
    del model
    gc.collect()
    return unties, breaks


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, tuple[bool, bool]]]:
    root = tmp_path_factory.mktemp("variants")
    bases: dict[str, Path] = {}
    out = {}
    for name in VARIANTS:
        arch, config = _variant(name)
        if arch not in bases:
            bases[arch] = build_base(arch, root / f"base-{arch}", tied=True)
        adapter = build_custom_adapter(arch, config, bases[arch], root / name)
        out[name] = (bases[arch], adapter, truth(arch, bases[arch], adapter))
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_unmodelled_variants_are_judged_by_peft(name: str, variants) -> None:
    base, adapter, (unties, breaks) = variants[name]
    report = audit(adapter, base=base)
    codes = {f.code for f in report.findings}
    assert ("TIE101" in codes) == unties, (name, unties, report.findings)
    assert ("TIE102" in codes) == breaks, (name, breaks, report.findings)
    assert "TIE105" not in codes
    for f in report.findings:
        if f.code in ("TIE101", "TIE102"):
            assert f.evidence["peft"]["version"] and "peft" in f.message
    assert {c.stage for c in report.comparisons} >= {"peft-adapter", "peft-merge-reload"}


@pytest.mark.parametrize("name", VARIANTS)
def test_without_peft_an_unmodelled_variant_is_a_finding(name: str, variants) -> None:
    base, adapter, _ = variants[name]
    report = audit(adapter, base=base, peft_check=False)
    [finding] = [f for f in report.findings if f.code == "TIE105"]
    assert "could not be checked" in finding.message and "--no-peft-check" in finding.message
    assert report.exit_code == 1  # a warning: the default --fail-on fails the build
    assert any(s.check == "peft-confirmation" for s in report.skipped)


def test_the_variants_really_break_something(variants) -> None:
    """The cases are not vacuous: peft unties or corrupts the pair in most of them."""
    truths = [t for _, _, t in variants.values()]
    assert sum(u for u, _ in truths) >= 2 and sum(b for _, b in truths) >= 1, truths
