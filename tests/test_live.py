"""audit_model: a live model, grouped by storage (views count), judged as save -> reload would leave it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from fixtures.builders import ARCHS
from tieaudit import audit_model
from tieaudit.model import TieStatus


def _model(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = ARCHS["llama"].make_config()
    cfg.tie_word_embeddings = tie
    return LlamaForCausalLM(cfg)


def _codes(model) -> set[str]:
    return {f.code for f in audit_model(model).findings}


def test_tied_model_is_clean() -> None:
    report = audit_model(_model())
    assert report.findings == () and report.groups[0].status is TieStatus.TIED
    assert report.target.layout == "live"


def test_untied_config_with_shared_storage_forecasts_the_missing_head(tmp_path) -> None:
    """The trap of ground-truth §2: flipping the config on a tied model; save_pretrained drops lm_head."""
    model = _model()
    model.config.tie_word_embeddings = False
    assert _codes(model) == {"TIE002"}
    # and the real library agrees: the head is missing after save + reload
    model.save_pretrained(tmp_path)
    _, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]


def test_view_sharing_storage_counts_as_tied() -> None:
    """Grouping by storage, not Parameter identity: a view of the embedding is still the embedding."""
    model = _model(tie=False)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.data.view(64, 16))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert _codes(model) == {"TIE002"}  # untied config + shared storage: the save drops one of them


@pytest.mark.parametrize(("delta", "code"), [(0.1, "TIE001"), (0.0, "TIE006")])
def test_separate_head_under_a_tied_config(delta: float, code: str) -> None:
    model = _model()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + delta)
    assert _codes(model) == {code}


def test_peft_wrapped_model_is_found_and_names_are_base_names() -> None:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    report = audit_model(wrapped)
    assert "at base_model.model" in (report.target.architecture or "")
    [group] = report.groups
    assert group.source == "model.embed_tokens.weight" and group.targets == ("lm_head.weight",)
    assert group.status is TieStatus.TIED


def test_flags_are_judged_as_they_reload() -> None:
    """T5Config forces the tie back on when config.json is read: flipping the live flag loses nothing,
    but readers of the raw JSON disagree (TIE005), as `tieaudit check` says on the saved directory."""
    from fixtures.builders import build_model

    model = build_model("t5")
    model.config.tie_word_embeddings = False
    assert _codes(model) == {"TIE005"}
