"""Rules TIE101-TIE104: PEFT adapters on tied models, judged against the base they are applied to."""

from __future__ import annotations

import math
from collections.abc import Iterator

from tieaudit.adapters import ModuleEdit
from tieaudit.forecast import MECH_DOUBLE, MECH_DROPPED, MECH_SHARED, MECH_SUM, GroupForecast, differs
from tieaudit.model import Finding, FixHint, Location, Severity
from tieaudit.rules.context import AdapterContext
from tieaudit.rules.registry import rule
from tieaudit.rules.wording import num as _num
from tieaudit.rules.wording import pct as _pct

MEASURED_TOL = 1e-4  # measured logit difference, relative to the logit scale, that counts as "changed"


def describe(edit: ModuleEdit | None) -> str:
    """What the adapter does to one layer, in words."""
    if edit is None or not edit.changes_weight:
        return "keeps the base weights"
    if edit.full_copy:
        return "is replaced by a trained copy (modules_to_save)"
    parts = []
    if edit.lora:
        parts.append(f"gets a LoRA delta (r={edit.lora.r}, scaling {edit.lora.scaling:.3g})")
    if edit.tokens:
        parts.append(f"has {len(edit.tokens[0])} trained token rows")
    return " and ".join(parts)


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _config_location(ctx: AdapterContext, tensor: str) -> Location:
    return ctx.edit_location(tensor)


@rule(
    code="TIE101",
    name="adapter-unties-weights",
    severity=Severity.WARNING,
    family="adapter",
    summary="the adapted model no longer ties a pair the base ties (one side adapted, or both differently)",
    explain="""
The base ties the pair (one shared matrix), but at run time the adapted model uses different weights
for the embedding and the head: only one side is adapted (LoRA or `modules_to_save` on
`embed_tokens` but not on `lm_head`, or the reverse), or both are adapted independently. The model
you trained is an untied model, although the base and its config say tied. PEFT only warns for
layers named `embed_tokens`/`lm_head`; GPT-2's `wte`, OPT's `model.decoder.embed_tokens` or
Falcon's `word_embeddings` get no warning at all.

This is a warning, not an error: the unmerged adapter computes what it was trained to compute. But
anything that re-ties the pair (merging, `tie_weights()`, exporting to a format that stores one
matrix) changes the model; see TIE102 for what a PEFT merge would do.

Fix: if you meant to keep the tie, retrain with `ensure_weight_tying=True` (peft >= 0.18). If you
meant an untied model, untie the base first (`tie_word_embeddings=False` with `lm_head` stored) and
merge with `tieaudit merge`.
""",
)
def adapter_unties_weights(ctx: AdapterContext) -> Iterator[Finding]:
    for fc in ctx.forecasts:
        for target in fc.runtime_untied():
            d = fc.adapter_diffs[target]
            s_desc = describe(ctx.edits.get(fc.source))
            t_desc = describe(ctx.edits.get(target))
            yield Finding(
                "TIE101",
                "adapter-unties-weights",
                Severity.WARNING,
                f"the base ties {target} to {fc.source}, but the adapted model uses different weights for them: "
                f"{_module(fc.source)} {s_desc}, while {_module(target)} {t_desc} (max |Δ| {_num(d.max_abs_diff)}, "
                f"relative {_num(d.rel_diff)}; probe logits max |Δ| {_num(d.max_abs_logit_diff)}, top-1 agreement "
                f"{_pct(d.top1_agreement)}): the adapter trained an untied model",
                _config_location(ctx, target),
                {
                    "source": fc.source,
                    "target": target,
                    "source_edit": s_desc,
                    "target_edit": t_desc,
                    "max_abs_diff": d.max_abs_diff,
                    "rel_diff": d.rel_diff,
                    "max_abs_logit_diff": d.max_abs_logit_diff,
                    "top1_agreement": d.top1_agreement,
                },
                FixHint(
                    "manual",
                    None,
                    "retrain with ensure_weight_tying=True to keep the tie, or untie the base before training",
                ),
            )


MECHANISM_TEXT = {
    MECH_SHARED: "PEFT merges the LoRA delta in place into the one weight the tied layers share, so the layer "
    "that was not adapted changes too",
    MECH_DOUBLE: "the tied LoRA factors (ensure_weight_tying) are merged once per tied layer into the one shared "
    "weight: the delta is added twice (W0 + 2ΔE)",
    MECH_SUM: "both layers' deltas are merged into the one shared weight (W0 + ΔE + ΔL), which neither layer used",
    MECH_DROPPED: "after the merge the config is untied but a layer still shares memory with another: "
    "save_pretrained drops it and it loads randomly initialised",
}


@rule(
    code="TIE102",
    name="merge-corrupts-tied-weights",
    severity=Severity.ERROR,
    family="adapter",
    summary="merging with PEFT and reloading would not reproduce the adapter's outputs",
    explain="""
`merge_and_unload()` -> `save_pretrained()` -> `from_pretrained()` would give a model whose tied
weights differ from what the unmerged adapter uses. With peft 0.21, a LoRA on a tied embedding or
head is merged in place into the one Parameter both layers share:

- LoRA on one side: the other side gets the delta too (logit errors of ~2.5 on a tiny Llama);
- LoRA on both sides: both become W0 + ΔE + ΔL, which neither layer used;
- `ensure_weight_tying=True`: the tied factors are merged once per layer: W0 + 2ΔE.

PEFT's post-merge check (untie the config when the data pointers differ) never fires, because the
pointers stay equal, and the saved config stays tied. The adapter itself is fine; only merging
breaks. tieaudit simulates the merge from the files and reports the forecast difference per tensor
(`comparisons`, stage `merge-reload`).

Fix: merge with `tieaudit merge ADAPTER --base BASE --output-dir DIR`, which applies a shared delta
once and unties the pair where the adapter did.
""",
)
def merge_corrupts_tied_weights(ctx: AdapterContext) -> Iterator[Finding]:
    reported = False
    meas = ctx.measured
    measured_text = (
        f" Measured with peft (--deep): logits max |Δ| {_num(meas.max_abs_logit_diff)} (logit scale "
        f"{_num(meas.logit_scale)}), top-1 agreement {_pct(meas.top1_agreement)}."
        if meas
        else ""
    )
    for fc in ctx.forecasts:
        bad = fc.corrupted()
        if not bad:
            continue
        worst = _worst(fc, bad)
        numbers = {}
        for m in bad:
            f = fc.members_forecast[m]
            numbers[m] = (
                {"dropped": True}
                if f.dropped or f.merge_diff is None
                else {
                    "max_abs_diff": f.merge_diff.max_abs_diff,
                    "rel_diff": f.merge_diff.rel_diff,
                    "max_abs_logit_diff": f.merge_diff.max_abs_logit_diff,
                    "top1_agreement": f.merge_diff.top1_agreement,
                    "embedding_rows_max_abs_diff": f.embedding_rows_diff,
                }
            )
        mechanisms = "; ".join(MECHANISM_TEXT[m] for m in fc.mechanisms) or "the merged weights differ"
        w = fc.members_forecast[worst]
        if w.dropped or w.merge_diff is None:
            measured = f"{worst} would be randomly initialised"
        else:
            d = w.merge_diff
            measured = (
                f"{worst} would change by max |Δ| {_num(d.max_abs_diff)} (relative {_num(d.rel_diff)}; probe logits "
                f"max |Δ| {_num(d.max_abs_logit_diff)}, top-1 agreement {_pct(d.top1_agreement)})"
            )
        base = ctx.base or "BASE"
        yield Finding(
            "TIE102",
            "merge-corrupts-tied-weights",
            Severity.ERROR,
            f"merging this adapter with PEFT and reloading would not reproduce it: {measured}. Why: {mechanisms}."
            f"{measured_text}",
            _config_location(ctx, worst),
            {
                "source": fc.source,
                "members": list(fc.members),
                "corrupted": bad,
                "mechanisms": list(fc.mechanisms),
                "config_tied_after_merge": fc.config_tied_after_merge,
                "forecast": numbers,
                "measured": None
                if meas is None
                else {
                    "max_abs_logit_diff": meas.max_abs_logit_diff,
                    "top1_agreement": meas.top1_agreement,
                    "logit_scale": meas.logit_scale,
                },
            },
            FixHint("safe", f"tieaudit merge {ctx.path} --base {base} --output-dir MERGED_DIR"),
        )
        reported = True
    if meas is not None and not reported and meas.max_abs_logit_diff > MEASURED_TOL * max(meas.logit_scale, 1.0):
        # reality wins over the forecast: the real merge changed the outputs
        yield Finding(
            "TIE102",
            "merge-corrupts-tied-weights",
            Severity.ERROR,
            f"merging this adapter with PEFT and reloading changed the outputs although no tied weight was "
            f"forecast to change:{measured_text}",
            Location(file="adapter_config.json"),
            {
                "measured": {
                    "max_abs_logit_diff": meas.max_abs_logit_diff,
                    "top1_agreement": meas.top1_agreement,
                    "logit_scale": meas.logit_scale,
                }
            },
            FixHint("manual", None, "report this checkpoint to tieaudit: the forecast missed a mechanism"),
        )


def _worst(fc: GroupForecast, bad: list[str]) -> str:
    def key(m: str) -> float:
        f = fc.members_forecast[m]
        if f.dropped or f.merge_diff is None:
            return math.inf
        return f.merge_diff.max_abs_logit_diff or f.merge_diff.max_abs_diff or 0.0

    return max(bad, key=key)


@rule(
    code="TIE103",
    name="tied-adapter-ignored",
    severity=Severity.WARNING,
    family="adapter",
    summary="an `ensure_weight_tying` adapter whose tied weights peft will ignore on this base",
    explain="""
The adapter was trained with `ensure_weight_tying=True` on a tied model: peft saved the tied layer's
weights (e.g. `lm_head` LoRA factors or its modules_to_save copy) in the file, but rewrote the
config to name only the embedding. On a base that does not tie the pair, peft attaches the adapter
to the embedding only and silently ignores the head weights in the file: the head keeps the base's
separate weights, and the adapted model is not the one that was trained. The same happens on a tied
base whose layers peft does not recognise: it re-ties the head only when the configured embedding is
named `embed_tokens` (GPT-2's `wte`, for one, is not), so a GPT-2 adapter trained with
`ensure_weight_tying` on LoRA loses its head LoRA on reload.

Fix: apply the adapter to the tied base it was trained on, or list the head in `target_modules` /
`modules_to_save` for an untied base.
""",
)
def tied_adapter_ignored(ctx: AdapterContext) -> Iterator[Finding]:
    if not ctx.settings.ensure_weight_tying:
        return
    for name, why in ctx.ignored:
        edit = ctx.edits[name]
        yield Finding(
            "TIE103",
            "tied-adapter-ignored",
            Severity.WARNING,
            f"the adapter was saved with ensure_weight_tying and holds weights for {_module(name)} "
            f"({describe(edit)}), but adapter_config.json does not name it and {why}: peft ignores those "
            "weights when loading, so the adapted model is not the one that was trained",
            Location(file="adapter_config.json", tensor=name, config_key="/target_modules"),
            {"tensor": name, "edit": describe(edit), "reason": why},
            FixHint(
                "manual",
                None,
                "apply the adapter to the tied base it was trained on, or name the layer in "
                "target_modules / modules_to_save",
            ),
        )


@rule(
    code="TIE104",
    name="adapter-base-mismatch",
    severity=Severity.ERROR,
    family="adapter",
    summary="base weights stored in the adapter differ from the base it is checked against",
    explain="""
PEFT saves a copy of the base embedding/head weights (`base_layer.weight`) with adapters that
target those layers. That copy differs from the base tieaudit was given, or the adapter's shapes do
not fit the base (a different vocabulary or hidden size): the adapter was trained on another base
(another revision, a resized vocabulary), and its outputs on this base are not the trained ones.

Fix: point `--base` (or `base_model_name_or_path`) at the base the adapter was trained on.
""",
)
def adapter_base_mismatch(ctx: AdapterContext) -> Iterator[Finding]:
    for mm in ctx.mismatches:
        numbers = (
            f" (max |Δ| {_num(mm.max_abs_diff)}, relative {_num(mm.rel_diff)})" if mm.max_abs_diff is not None else ""
        )
        yield Finding(
            "TIE104",
            "adapter-base-mismatch",
            Severity.ERROR,
            f"{mm.param}: {mm.detail}{numbers}: the adapter was not trained on this base",
            Location(file="adapter_model.safetensors", tensor=mm.param),
            {"tensor": mm.param, "kind": mm.kind, "max_abs_diff": mm.max_abs_diff, "rel_diff": mm.rel_diff},
            FixHint("manual", None, "use the base the adapter was trained on (--base)"),
        )


__all__ = ["differs"]
