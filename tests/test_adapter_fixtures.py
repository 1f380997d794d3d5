"""The adapter fixtures reproduce what peft 0.21.2 / transformers 5.23 really do (ground-truth.md §3).

Every number here is measured with the real libraries on tiny models: the unmerged PeftModel versus
``merge_and_unload()`` -> ``save_pretrained`` -> ``from_pretrained``, the effective weights at run
time, and the adapter files themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.adapter_builders import (
    ADAPTER_CASES,
    ADAPTER_MODEL,
    ADAPTER_SPECS,
    TRAINABLE_TOKEN_IDS,
    UNSUPPORTED,
    Reality,
    build_adapter,
    case_base_tied,
    case_config,
)

P = "base_model.model."

WRONG_MERGE = [
    *(("llama", c) for c in ("lora_embed", "lora_head", "lora_both", "lora_both_tying", "lora_embed_tying")),
    ("llama", "lora_embed_rslora_pattern"),
    ("gpt2", "lora_embed"),
    ("gpt2", "lora_both_tying"),
    ("opt", "lora_embed"),
    ("opt", "lora_both_tying"),
]
CORRECT_MERGE = [
    *(("llama", c) for c in ("mts_embed", "mts_head", "mts_both", "mts_embed_tying")),
    *(("llama", c) for c in ("trainable_tokens", "trainable_tokens_tying")),
    *(("llama", c) for c in ("untied_base_lora_both", "untied_base_lora_both_tying")),
    ("gpt2", "mts_embed"),
    ("gpt2", "trainable_tokens"),
    ("gpt2", "untied_base_lora_both"),
    ("opt", "mts_embed"),
    ("opt", "mts_embed_tying"),
    ("opt", "trainable_tokens_tying"),
    ("opt", "untied_base_lora_both"),
]
ALL = WRONG_MERGE + CORRECT_MERGE


@dataclass(frozen=True)
class Built:
    arch: str
    case: str
    base: Path
    adapter: Path
    real: Reality

    @property
    def files(self) -> dict[str, torch.Tensor]:
        return load_file(self.adapter / ADAPTER_MODEL)

    def base_weight(self, name: str) -> torch.Tensor:
        return load_file(self.base / "model.safetensors")[name]


@pytest.fixture(scope="module")
def built(adapter_case):
    """``built(arch, case)`` -> :class:`Built` (shared with the verdict tests through conftest)."""

    def get(arch: str, case: str) -> Built:
        base, adapter, real = adapter_case(arch, case)
        return Built(arch, case, base, adapter, real)

    return get


def _names(arch: str) -> tuple[str, str, str]:
    spec = ADAPTER_SPECS[arch]
    return spec.embed, spec.head, spec.embed_leaf


def _scaling(b: Built, leaf: str, r: int) -> float:
    cfg = b.real.adapter_config
    alpha = cfg.get("alpha_pattern", {}).get(leaf, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _delta_embed(b: Built) -> torch.Tensor:
    """ΔE = (B @ A).T * scaling, [vocab, hidden], from the adapter file and its saved config."""
    embed, _, leaf = _names(b.arch)
    f = b.files
    a, bb = f[f"{P}{embed}.lora_embedding_A"], f[f"{P}{embed}.lora_embedding_B"]
    return (bb @ a).T * _scaling(b, leaf, a.shape[0])


def _delta_head(b: Built) -> torch.Tensor:
    """ΔL = B @ A * scaling, [vocab, hidden]."""
    _, head, _ = _names(b.arch)
    f = b.files
    a, bb = f[f"{P}{head}.lora_A.weight"], f[f"{P}{head}.lora_B.weight"]
    return bb @ a * _scaling(b, head, a.shape[0])


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= atol


# --------------------------------------------------------------------------------------------------
# The ground-truth table: merged -> saved -> reloaded vs the unmerged PeftModel
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "case"), WRONG_MERGE)
def test_lora_on_a_tied_layer_merges_wrong(built, arch, case):
    r = built(arch, case).real
    assert r.logit_scale > 0.1
    assert r.adapter_vs_merged_logits > 0.1 * r.logit_scale
    assert r.merged_config_tied is True  # PEFT's post-merge untie check never fires: one shared Parameter
    assert r.merged_head_stored is False


@pytest.mark.parametrize(("arch", "case"), CORRECT_MERGE)
def test_modules_to_save_trainable_tokens_and_untied_bases_merge_correctly(built, arch, case):
    r = built(arch, case).real
    assert r.logit_scale > 0.1
    assert r.adapter_vs_merged_logits < 1e-4 * r.logit_scale


@pytest.mark.parametrize(("arch", "case"), ALL)
def test_adapter_files_round_trip(built, arch, case):
    """PeftModel.from_pretrained reproduces the in-memory adapter exactly, except GPT-2 + ensure_weight_tying."""
    r = built(arch, case).real
    if (arch, case) == ("gpt2", "lora_both_tying"):
        return  # see test_gpt2_ensure_weight_tying_loses_the_head_lora_on_reload
    assert r.ignored_adapter_keys == ()
    assert r.adapter_roundtrip_logits == 0.0


@pytest.mark.parametrize(("arch", "case"), ALL)
def test_runtime_weights_are_vocab_by_hidden(built, arch, case):
    r = built(arch, case).real
    shapes = {t.shape for t in (r.runtime_embed, r.runtime_head, r.merged_embed, r.merged_head)}
    assert shapes == {torch.Size([64, 16])}
    assert all(t.dtype == torch.float32 for t in (r.runtime_embed, r.merged_head))


def test_no_case_is_refused_by_peft():
    assert UNSUPPORTED == {}
    assert len(ADAPTER_CASES) == 14


# --------------------------------------------------------------------------------------------------
# LoRA on a tied layer: the exact merge arithmetic
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("case", ["lora_both_tying", "lora_embed_tying"])
def test_ensure_weight_tying_lora_merges_the_delta_twice(built, arch, case):
    b = built(arch, case)
    r = b.real
    embed, _, _ = _names(arch)
    w0 = b.base_weight(f"{embed}.weight")
    d = _delta_embed(b)
    assert r.runtime_embed_vs_head == 0.0  # tied at run time
    assert _close(r.runtime_embed, w0 + d)
    assert torch.equal(r.merged_embed, r.merged_head)
    assert _close(r.merged_embed, w0 + 2 * d)
    assert not _close(r.merged_embed, w0 + d, atol=1e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_lora_on_tied_embedding_only_moves_the_head_too(built, arch):
    b = built(arch, "lora_embed")
    r = b.real
    embed, _, _ = _names(arch)
    w0 = b.base_weight(f"{embed}.weight")
    d = _delta_embed(b)
    assert torch.equal(r.runtime_head, w0)  # the PeftModel's head is the untouched base
    assert _close(r.runtime_embed, w0 + d)
    assert r.runtime_embed_vs_head > 0.1
    assert _close(r.merged_embed, w0 + d) and _close(r.merged_head, w0 + d)


def test_lora_on_tied_head_only_moves_the_embedding_too(built):
    b = built("llama", "lora_head")
    r = b.real
    w0 = b.base_weight("model.embed_tokens.weight")
    d = _delta_head(b)
    assert torch.equal(r.runtime_embed, w0)
    assert _close(r.runtime_head, w0 + d)
    assert _close(r.merged_embed, w0 + d) and _close(r.merged_head, w0 + d)


def test_lora_on_both_tied_layers_sums_both_deltas(built):
    b = built("llama", "lora_both")
    r = b.real
    w0 = b.base_weight("model.embed_tokens.weight")
    de, dl = _delta_embed(b), _delta_head(b)
    assert _close(r.runtime_embed, w0 + de) and _close(r.runtime_head, w0 + dl)
    assert torch.equal(r.merged_embed, r.merged_head)
    assert _close(r.merged_embed, w0 + de + dl)


def test_rslora_rank_and_alpha_patterns_set_the_embedding_scaling(built):
    b = built("llama", "lora_embed_rslora_pattern")
    r, f = b.real, b.files
    assert f[f"{P}model.embed_tokens.lora_embedding_A"].shape == (8, 64)
    assert f[f"{P}model.embed_tokens.lora_embedding_B"].shape == (16, 8)
    assert f[f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 16)
    assert _scaling(b, "embed_tokens", 8) == pytest.approx(4 / math.sqrt(8))
    w0 = b.base_weight("model.embed_tokens.weight")
    assert _close(r.runtime_embed, w0 + _delta_embed(b))
    assert _close(r.merged_head, w0 + _delta_embed(b))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_ensure_weight_tying_stores_transposed_embedding_factors_as_head_lora(built, arch):
    b = built(arch, "lora_both_tying")
    embed, head, leaf = _names(arch)
    f = b.files
    assert torch.equal(f[f"{P}{head}.lora_A.weight"], f[f"{P}{embed}.lora_embedding_B"].T)
    assert torch.equal(f[f"{P}{head}.lora_B.weight"], f[f"{P}{embed}.lora_embedding_A"].T)
    targets = set(b.real.adapter_config["target_modules"])
    attn = set(ADAPTER_SPECS[arch].attn)
    assert targets == attn | {leaf, embed}  # lm_head dropped, the full embedding name added
    assert b.real.adapter_config["ensure_weight_tying"] is True


# --------------------------------------------------------------------------------------------------
# modules_to_save, trainable tokens
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_modules_to_save_embedding_unties_at_run_time_and_after_merge(built, arch):
    b = built(arch, "mts_embed")
    r = b.real
    embed, _, _ = _names(arch)
    w0 = b.base_weight(f"{embed}.weight")
    trained = b.files[f"{P}{embed}.weight"]
    assert torch.equal(r.runtime_head, w0)
    assert torch.equal(r.runtime_embed, trained)
    assert r.runtime_embed_vs_head > 0.1
    assert r.merged_config_tied is False and r.merged_head_stored is True
    assert torch.equal(r.merged_embed, trained) and torch.equal(r.merged_head, w0)
    assert any("no longer tied after merging" in w for w in r.warnings)


@pytest.mark.parametrize("case", ["mts_head", "mts_both"])
def test_modules_to_save_head_unties(built, case):
    r = built("llama", case).real
    assert r.merged_config_tied is False and r.merged_head_stored is True
    assert r.runtime_embed_vs_head > 0.1


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_modules_to_save_with_ensure_weight_tying_stays_tied(built, arch):
    b = built(arch, "mts_embed_tying")
    r, f = b.real, b.files
    embed, head, leaf = _names(arch)
    assert torch.equal(f[f"{P}{head}.weight"], f[f"{P}{embed}.weight"])  # stored twice, bitwise equal
    assert set(r.adapter_config["modules_to_save"]) == {leaf, embed}  # lm_head is not listed
    assert r.runtime_embed_vs_head == 0.0
    assert torch.equal(r.runtime_embed, f[f"{P}{embed}.weight"])
    assert r.merged_config_tied is True and r.merged_head_stored is False


@pytest.mark.parametrize(
    ("arch", "case"),
    [
        ("llama", "trainable_tokens"),
        ("llama", "trainable_tokens_tying"),
        ("gpt2", "trainable_tokens"),
        ("opt", "trainable_tokens_tying"),
    ],
)
def test_trainable_tokens_replace_rows_and_stay_tied(built, arch, case):
    b = built(arch, case)
    r = b.real
    embed, _, _ = _names(arch)
    w0 = b.base_weight(f"{embed}.weight")
    rows = b.files[f"{P}{embed}.token_adapter.trainable_tokens_delta"]
    idx = list(TRAINABLE_TOKEN_IDS)
    others = [i for i in range(w0.shape[0]) if i not in idx]
    assert rows.shape == (len(idx), w0.shape[1])
    assert torch.equal(r.runtime_embed[idx], rows)  # replacement values, not additive deltas
    assert not _close(rows, w0[idx], atol=1e-2)
    assert torch.equal(r.runtime_embed[others], w0[others])
    assert r.runtime_embed_vs_head == 0.0  # the head is wrapped with a tied token adapter, flag or not
    assert r.merged_config_tied is True and r.merged_head_stored is False
    assert torch.equal(r.merged_embed, r.runtime_embed) and torch.equal(r.merged_head, r.runtime_embed)
    assert b.real.adapter_config["trainable_token_indices"] == idx


# --------------------------------------------------------------------------------------------------
# Untied bases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "case"),
    [
        ("llama", "untied_base_lora_both"),
        ("llama", "untied_base_lora_both_tying"),
        ("gpt2", "untied_base_lora_both"),
        ("opt", "untied_base_lora_both"),
    ],
)
def test_untied_base_lora_merges_each_layer_separately(built, arch, case):
    b = built(arch, case)
    r = b.real
    embed, head, _ = _names(arch)
    e0, h0 = b.base_weight(f"{embed}.weight"), b.base_weight(f"{head}.weight")
    assert not torch.equal(e0, h0)
    assert r.merged_config_tied is False and r.merged_head_stored is True
    assert _close(r.runtime_embed, e0 + _delta_embed(b)) and _close(r.runtime_head, h0 + _delta_head(b))
    assert _close(r.merged_embed, r.runtime_embed) and _close(r.merged_head, r.runtime_head)
    assert r.runtime_embed_vs_head > 0.1


def test_ensure_weight_tying_on_untied_base_only_warns(built):
    r = built("llama", "untied_base_lora_both_tying").real
    assert any("no tied modules were found" in w for w in r.warnings)
    assert set(r.adapter_config["target_modules"]) == {"q_proj", "v_proj", "embed_tokens", "lm_head"}
    assert r.adapter_config["ensure_weight_tying"] is True


def test_untied_base_requires_an_untied_base_dir(built, tmp_path):
    b = built("llama", "lora_embed")
    with pytest.raises(ValueError, match="untied base"):
        build_adapter("llama", "untied_base_lora_both", b.base, tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# Adapter files: key names, base_layer copies, configs, warnings
# --------------------------------------------------------------------------------------------------


def _expected_tie_keys(arch: str, case: str) -> set[str]:
    embed, head, _ = _names(arch)
    e_lora = {f"{embed}.lora_embedding_A", f"{embed}.lora_embedding_B"}
    h_lora = {f"{head}.lora_A.weight", f"{head}.lora_B.weight"}
    e_base, h_base = {f"{embed}.base_layer.weight"}, {f"{head}.base_layer.weight"}
    if arch == "gpt2":  # save_embedding_layers="auto" only recognises embed_tokens / lm_head
        e_base = set() if case in ("lora_embed", "lora_both_tying") else e_base
        h_base = set() if case == "lora_both_tying" else h_base
    keys = {
        "lora_embed": e_lora | e_base,
        "lora_embed_rslora_pattern": e_lora | e_base,
        "lora_head": h_lora | h_base,
        "mts_embed": {f"{embed}.weight"},
        "mts_head": {f"{head}.weight"},
        "mts_both": {f"{embed}.weight", f"{head}.weight"},
        "mts_embed_tying": {f"{embed}.weight"} if arch == "gpt2" else {f"{embed}.weight", f"{head}.weight"},
        "trainable_tokens": {f"{embed}.token_adapter.trainable_tokens_delta"},
        "trainable_tokens_tying": {f"{embed}.token_adapter.trainable_tokens_delta"},
    }.get(case, e_lora | h_lora | e_base | h_base)  # lora on both (with or without the flag, any base)
    return {P + k for k in keys}


@pytest.mark.parametrize(("arch", "case"), ALL)
def test_adapter_key_names(built, arch, case):
    r = built(arch, case).real
    assert all(k.startswith(P) and ".default." not in k for k in r.adapter_keys)
    tie_keys = {k for k in r.adapter_keys if "layers." not in k and ".h." not in k}
    assert tie_keys == _expected_tie_keys(arch, case)
    attn = {k for k in r.adapter_keys if k not in tie_keys}
    assert attn == {f"{P}{m}.lora_{x}.weight" for m in _attn_modules(arch) for x in "AB"}


def _attn_modules(arch: str) -> list[str]:
    return {
        "llama": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
        "gpt2": ["transformer.h.0.attn.c_attn"],
        "opt": ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.v_proj"],
    }[arch]


@pytest.mark.parametrize(("arch", "case"), ALL)
def test_base_layer_copies_are_the_base_weights(built, arch, case):
    b = built(arch, case)
    embed, head, _ = _names(arch)
    f = b.files
    for name in (embed, head):
        key = f"{P}{name}.base_layer.weight"
        if key in f:
            assert torch.equal(f[key], b.base_weight(f"{embed}.weight" if case_base_tied(case) else f"{name}.weight"))


@pytest.mark.parametrize(("arch", "case"), ALL)
def test_saved_config_keeps_what_was_passed_unless_ensure_weight_tying(built, arch, case):
    b = built(arch, case)
    cfg, passed = b.real.adapter_config, case_config(arch, case)
    rewritten = {"target_modules"} if "lora" in case else {"modules_to_save"}
    peft_rewrites = passed.get("ensure_weight_tying") and case_base_tied(case) and arch != "gpt2"
    for k, v in passed.items():
        if k == "fan_in_fan_out" and "lm_head" in cfg["target_modules"]:
            assert cfg[k] is False  # peft flips it for the Linear head (and back for Conv1D on load)
        elif peft_rewrites and k in rewritten:
            continue  # checked in the ensure_weight_tying tests
        elif (arch, case, k) == ("gpt2", "lora_both_tying", "target_modules"):
            assert set(cfg[k]) == {"c_attn", "wte", "transformer.wte"}
        elif (arch, case, k) == ("gpt2", "lora_both_tying", "fan_in_fan_out"):
            assert cfg[k] is False
        elif isinstance(v, list):
            assert sorted(cfg[k]) == sorted(v), k
        else:
            assert cfg[k] == v, k


def test_gpt2_ensure_weight_tying_loses_the_head_lora_on_reload(built):
    """At build time peft ties GPT-2's head LoRA to wte (lm_head is a recognised name); the saved config
    drops lm_head and lists only ``wte`` names, which peft does not recognise on reload, so the stored
    lm_head factors are silently ignored: the reloaded adapter is not the trained one."""
    b = built("gpt2", "lora_both_tying")
    r = b.real
    assert r.ignored_adapter_keys == (f"{P}lm_head.lora_A.weight", f"{P}lm_head.lora_B.weight")
    assert r.adapter_roundtrip_logits is not None
    assert r.adapter_roundtrip_logits > 0.1 * r.logit_scale
    assert torch.equal(r.runtime_head, b.base_weight("transformer.wte.weight"))
    assert r.runtime_embed_vs_head > 0.1
    assert any("no tied modules are added" in w for w in r.warnings)


def test_gpt2_lora_on_wte_warns_about_nothing(built):
    r = built("gpt2", "lora_embed").real
    assert not [w for w in r.warnings if "tie" in w.lower()]
    llama = built("llama", "lora_embed").real
    assert any("`ensure_weight_tying` is not set to True" in w for w in llama.warnings)
