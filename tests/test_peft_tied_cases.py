"""peft's own tied-weight tests (tests/test_initialization.py::TestWeightTying, tests/test_trainable_tokens.py,
tests/test_tuners_utils.py::TestBaseTunerWarnForTiedEmbeddings), rebuilt as adapters on disk and judged against the
real libraries: a tiny tied model per family (an `embed_tokens` decoder, GPT-2's `wte`, an encoder-decoder with
`shared`), each configuration those tests use applied with `get_peft_model`, every adapter tensor non-zero, saved.
The truth is measured on whole models (PeftModel.from_pretrained's forward of each tied layer; peft's own
merge_and_unload -> save_pretrained -> from_pretrained), and tieaudit must agree:

- check: TIE101 exactly when the adapted model unties the pair, TIE102 exactly when peft's merge changes the logits,
  TIE105 when peft itself cannot run the adapted tied layers (never a silent pass);
- merge: the merged model gives the adapter's logits (also after tie_weights()), or exit 2 with nothing written.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch

from fixtures.adapter_builders import _probe_weight, load_any, logits_any, probe_ids, randomize, tiny_tied
from tieaudit import audit
from tieaudit.errors import TieauditError
from tieaudit.repair.merge import merge

TOL = 1e-4  # x the logit scale


def _config(family: str, case: str):
    from peft import LoKrConfig, LoraConfig, TrainableTokensConfig

    _, attn, emb, _ = tiny_tied(family)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "fan_in_fan_out": family == "gpt2"}
    kind, _, rest = case.partition(":")
    ensure = rest.endswith("+ensure")
    which = rest.removesuffix("+ensure")
    layers = {"emb": [emb], "head": ["lm_head"], "both": [emb, "lm_head"]}
    if kind == "tm":  # TestWeightTying: target_modules on the tied layers
        return LoraConfig(**lora, target_modules=[*attn, *layers[which]], ensure_weight_tying=ensure)
    if kind == "regex":  # ...target_modules_str_lora
        return LoraConfig(**lora, target_modules=rf".*({'|'.join(attn)}|{emb}|lm_head)$", ensure_weight_tying=True)
    if kind == "all-linear":  # ...target_modules_all_linear_lora
        return LoraConfig(**lora, target_modules="all-linear", ensure_weight_tying=True)
    if kind == "mts":  # modules_to_save on the tied layers
        return LoraConfig(**lora, target_modules=attn, modules_to_save=layers[which], ensure_weight_tying=ensure)
    if kind == "lokr-mts":  # test_weight_tying_tied_model_lokr
        return LoKrConfig(r=4, target_modules=attn, modules_to_save=[emb])
    if kind == "lokr-head":  # test_weight_tying_tied_model_target_modules_lokr
        return LoKrConfig(r=4, target_modules=[*attn, "lm_head"])
    if kind == "tti-list":  # test_weight_tying_applied_when_model_is_tied
        return LoraConfig(**lora, target_modules=attn, trainable_token_indices=[1, 2, 3])
    if kind == "tti-same":  # test_ensure_weight_tying_applied_with_same_indices
        return LoraConfig(
            **lora,
            target_modules=attn,
            trainable_token_indices={emb: [1, 2], "lm_head": [1, 2]},
            ensure_weight_tying=True,
        )
    if kind == "tti-different":  # test_weight_tying_bc_different_indices_treated_separately
        return LoraConfig(**lora, target_modules=attn, trainable_token_indices={emb: [3, 4], "lm_head": [1, 2]})
    assert kind == "tokens", case  # test_weight_tying_applied_when_model_is_tied_standalone
    return TrainableTokensConfig(target_modules=[emb], token_indices=[1, 2, 3])


ALL = [
    *(f"tm:{w}{e}" for w in ("emb", "head", "both") for e in ("", "+ensure")),
    "regex:",
    "all-linear:",
    *(f"mts:{w}{e}" for w in ("emb", "head", "both") for e in ("", "+ensure")),
    "lokr-mts:",
    "lokr-head:",
    "tti-list:",
    "tti-same:",
    "tti-different:",
    "tokens:",
]
NAMED = ["tm:emb+ensure", "tm:head+ensure", "tm:both", "mts:emb+ensure", "mts:both+ensure", "tti-list:", "tokens:"]
CASES = [("llama", c) for c in ALL] + [(f, c) for f in ("gpt2", "bart") for c in NAMED]
# what peft refuses to build, as peft 0.21.2 says (nothing to audit)
REFUSED = {("gpt2", "lokr-mts:"), ("gpt2", "lokr-head:")}


class Truth:
    """What the real libraries do with base + adapter, on whole models."""

    def __init__(self, base: Path, adapter: Path, members: list[str]) -> None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_any(base), str(adapter)).eval()
        inner = model.get_base_model()
        vocab, hidden = inner.get_input_embeddings().weight.shape
        ids = probe_ids(vocab)
        self.runs = True
        try:
            weights = [
                _probe_weight(inner.get_submodule(m), "head" if m == "lm_head" else "embed", vocab, hidden)
                for m in members
            ]
            self.reference = logits_any(model, ids)
        except Exception:  # peft's adapted model itself fails to run
            self.runs, self.unties, self.breaks = False, False, False
            return
        self.unties = any(float((w - weights[0]).abs().max()) > 1e-5 for w in weights[1:])
        try:
            merged = model.merge_and_unload()
            with tempfile.TemporaryDirectory() as tmp:
                merged.save_pretrained(tmp)
                after = logits_any(load_any(Path(tmp)), ids)
            self.breaks = float((after - self.reference).abs().max()) > TOL * float(self.reference.abs().max())
        except Exception:  # peft's merge path fails: no merged model to be had
            self.breaks = True
        del model
        gc.collect()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """(family, case) -> (base, adapter, members, Truth), or None where peft refuses the configuration."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("peft-tied")
    bases: dict[str, Path] = {}
    cache: dict[tuple[str, str], tuple[Path, Path, list[str], Truth] | None] = {}

    def get(family: str, case: str):
        if (family, case) in cache:
            return cache[family, case]
        torch.manual_seed(0)
        model, _, _, members = tiny_tied(family)
        if family not in bases:
            bases[family] = root / f"{family}-base"
            model.save_pretrained(bases[family])
        base = bases[family]
        try:
            peft_model = get_peft_model(load_any(base), _config(family, case))
        except Exception:
            cache[family, case] = None
            return None
        randomize(peft_model, 0)
        adapter = root / f"{family}-{case.replace(':', '-').replace('+', '-')}"
        peft_model.save_pretrained(adapter)
        cache[family, case] = (base, adapter, members, Truth(base, adapter, members))
        return cache[family, case]

    return get


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_peft_tied_weight_case(case: tuple[str, str], built, tmp_path: Path) -> None:
    got = built(*case)
    assert (got is None) == (case in REFUSED), case
    if got is None:
        return  # peft refuses to build it: there is no adapter to audit
    base, adapter, _, truth = got
    report = audit(adapter, base=base)
    codes = {f.code for f in report.findings}
    if not truth.runs:
        assert "TIE105" in codes and report.exit_code != 0, report.findings
        return
    assert ("TIE101" in codes) == truth.unties, (truth.unties, report.findings)
    assert ("TIE102" in codes) == truth.breaks, (truth.breaks, report.findings)
    assert "TIE105" not in codes, report.findings
    out = tmp_path / "merged"
    try:
        result = merge(adapter, base=base, output_dir=out)
    except TieauditError as exc:  # a refusal: exit 2, one line, nothing written
        assert exc.exit_code == 2 and not out.exists() and "\n" not in str(exc)
        return
    assert result.exit_code == 0 and result.merge_run.verified_by
    model = load_any(out)
    ids = probe_ids(model.get_input_embeddings().weight.shape[0])
    scale = float(truth.reference.abs().max())
    assert float((logits_any(model, ids) - truth.reference).abs().max()) <= TOL * scale
    model.tie_weights()
    assert float((logits_any(model, ids) - truth.reference).abs().max()) <= TOL * scale
