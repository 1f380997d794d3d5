"""TIE005 names the reader, the flag it reads and what it would load (tieaudit/ties/readers.py, docs/readers.md).

Each checkpoint is a real ``save_pretrained`` of a tiny model built from its class's own default config. Where the
reader can run here (accelerate), the test runs it and checks the claimed consequence; vLLM cannot be installed
next to the locked transformers, so its claims are checked against the table generated from its source.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from tieaudit import audit
from tieaudit.model import Finding, Severity
from tieaudit.ties import vllm_registry
from tools import zoo


def _save(tmp_path: Path, cls_name: str, tie: bool | None = None, head: str = "as built") -> Path:
    """``cls_name`` built tiny, every flag set to ``tie`` (None: the default config), saved. ``head``: ``as built``,
    ``separate`` (a copy of the embedding) or ``trained`` (the embedding plus noise)."""
    model, _ = zoo._instantiate(cls_name, tie_flags=tie)
    if head != "as built":
        name = _head_name(model)
        value = model.get_input_embeddings().weight.detach().clone()
        if head == "trained":
            value += torch.randn(value.shape, generator=torch.Generator().manual_seed(3)) * 0.05
        zoo._replace_param(model, name, value)
    out = tmp_path / f"{cls_name}-{tie}-{head}".replace(" ", "_")
    model.save_pretrained(out)
    return out


def _head_name(model: Any) -> str:
    head = model.get_output_embeddings()
    return next(f"{n}.weight" for n, m in model.named_modules() if m is head)


def _conflicts(path: Path) -> list[Finding]:
    return [f for f in audit(path).findings if f.code == "TIE005"]


def test_composite_text_config_disagreement_is_accelerate_only_info(tmp_path: Path, caplog: Any) -> None:
    """Qwen3VLMoe's stock config: top level false (transformers and vLLM), text_config true (accelerate). accelerate
    only logs; tieaudit says so at info level, and the real accelerate logs exactly that."""
    path = _save(tmp_path, "Qwen3VLMoeForConditionalGeneration")
    [finding] = _conflicts(path)
    assert finding.severity is Severity.INFO
    assert finding.location.config_key == "/text_config/tie_word_embeddings"
    readers = finding.evidence["readers"]
    assert [r["reader"] for r in readers] == ["accelerate"]
    assert readers[0]["value"] is True and "The model weights are not tied" in finding.message

    from accelerate import infer_auto_device_map
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # transformers unties
    with caplog.at_level(logging.WARNING):
        infer_auto_device_map(model, max_memory={"cpu": 10**10})
    assert "The model weights are not tied" in caplog.text


def test_accelerate_reading_false_is_info_and_says_nothing_changes(tmp_path: Path) -> None:
    """Mistral3's stock config: top level true (transformers ties), text_config false: accelerate reads false."""
    [finding] = _conflicts(_save(tmp_path, "Mistral3ForConditionalGeneration"))
    assert finding.severity is Severity.INFO
    assert [(r["reader"], r["value"]) for r in finding.evidence["readers"]] == [("accelerate", False)]
    assert "loads no weight differently" in finding.message
    assert audit(_save(tmp_path, "Mistral3ForConditionalGeneration")).exit_code == 0


@pytest.mark.parametrize(
    "cls_name",
    ["VisionEncoderDecoderModel", "SpeechEncoderDecoderModel", "MusicgenForConditionalGeneration"],
)
def test_no_conflict_where_every_reader_agrees(tmp_path: Path, cls_name: str) -> None:
    """Formerly false alarms: the wrapper's unused top-level flag, and a T5 text encoder's internal tie judged by
    the decoder's flag. accelerate reads the decoder's config, like transformers."""
    path = _save(tmp_path, cls_name)
    assert _conflicts(path) == []
    assert audit(path).exit_code == 0


def test_vllm_always_tied_class_discards_a_trained_head(tmp_path: Path) -> None:
    """Gemma2 untied with a trained head: transformers loads it; vLLM's Gemma2 always ties and serves the
    embedding. Warning, naming vLLM and its version."""
    assert "Gemma2ForCausalLM" in vllm_registry.ALWAYS_TIES
    [finding] = _conflicts(_save(tmp_path, "Gemma2ForCausalLM", tie=False, head="trained"))
    assert finding.severity is Severity.WARNING
    [reader] = finding.evidence["readers"]
    assert reader["reader"] == "vllm" and reader["ignores_flag"] and reader["verified"] == vllm_registry.VERSION
    assert "discards the stored lm_head.weight" in finding.message
    assert f"vLLM {vllm_registry.VERSION}" in finding.message


def test_vllm_always_tied_class_with_an_equal_head_is_info(tmp_path: Path) -> None:
    """The same, but the separate head equals the embedding: tieaudit compares them (a reader ties the pair) and
    vLLM serves the same weights."""
    report = audit(_save(tmp_path, "Gemma2ForCausalLM", tie=False, head="separate"))
    [finding] = [f for f in report.findings if f.code == "TIE005"]
    assert finding.severity is Severity.INFO and "serves the same weights" in finding.message
    assert report.comparisons, "the pair was not compared"


def test_vllm_never_tied_class_misses_a_dropped_head(tmp_path: Path) -> None:
    """DeepseekV3 saved tied (no lm_head.weight in the file): vLLM never ties it and serves uninitialised memory."""
    assert "DeepseekV3ForCausalLM" in vllm_registry.NEVER_TIES
    [finding] = _conflicts(_save(tmp_path, "DeepseekV3ForCausalLM", tie=True))
    assert finding.severity is Severity.WARNING
    assert "finds no lm_head.weight and serves an uninitialised head" in finding.message


def test_architectures_vllm_does_not_serve_have_no_vllm_claim(tmp_path: Path) -> None:
    """JanusForConditionalGeneration has no native vLLM class: only accelerate is named."""
    assert "JanusForConditionalGeneration" not in vllm_registry.ARCHITECTURES
    for finding in _conflicts(_save(tmp_path, "JanusForConditionalGeneration")):
        assert {r["reader"] for r in finding.evidence["readers"]} == {"accelerate"}


def test_reader_table_is_the_generated_one() -> None:
    """The vLLM table is generated (tools/vllm_table.py), not edited: its shape and a few facts from the source."""
    assert vllm_registry.VERSION == "0.33.0"
    assert len(vllm_registry.ARCHITECTURES) > 200
    assert vllm_registry.ALWAYS_TIES <= vllm_registry.ARCHITECTURES
    assert vllm_registry.NEVER_TIES <= vllm_registry.ARCHITECTURES
    assert vllm_registry.MULTIMODAL <= vllm_registry.ARCHITECTURES
    assert {"LlamaForCausalLM", "Mistral3ForConditionalGeneration"} <= vllm_registry.ARCHITECTURES
