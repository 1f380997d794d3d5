"""Rules TIE101-TIE104: PEFT adapters on tied models, judged against the base they are applied to."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tieaudit.adapter.context import AdapterContext
from tieaudit.adapter.files import ModuleEdit
from tieaudit.adapter.forecast import MECHANISM_TEXT, GroupForecast, differs
from tieaudit.model import Applicability, FixHint, Location, Severity

if TYPE_CHECKING:
    from tieaudit.adapter.confirm import PeftView
    from tieaudit.adapter.deep import Measured
    from tieaudit.adapter.peft_table import Recorded
from tieaudit.rules.registry import Violation, rule, violation
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
def adapter_unties_weights(ctx: AdapterContext) -> Iterator[Violation]:
    forecasts = {fc.source: fc for fc in ctx.forecasts}
    views = {v.source: v for v in ctx.peft}
    recorded = {r.source: r for r in ctx.recorded}
    for source in [*forecasts, *(s for s in views if s not in forecasts)]:
        fc, view = forecasts.get(source), views.get(source)
        untied = view.runtime_untied() if view is not None else fc.runtime_untied() if fc is not None else []
        for target in untied:
            s_desc, t_desc = _edit_words(ctx, source, fc, view), _edit_words(ctx, target, fc, view)
            evidence: dict[str, object] = {"source": source, "target": target, "source_edit": s_desc}
            evidence["target_edit"] = t_desc
            if fc is not None and (view is None or view.agrees):
                d = fc.adapter_diffs[target]
                numbers = (
                    f"max |Δ| {_num(d.max_abs_diff)}, relative {_num(d.rel_diff)}; probe logits max |Δ| "
                    f"{_num(d.max_abs_logit_diff)}, top-1 agreement {_pct(d.top1_agreement)}"
                )
                evidence.update(
                    max_abs_diff=d.max_abs_diff,
                    rel_diff=d.rel_diff,
                    max_abs_logit_diff=d.max_abs_logit_diff,
                    top1_agreement=d.top1_agreement,
                )
            else:
                assert view is not None
                g = view.runtime[target]
                numbers = (
                    f"probe rows max |Δ| {_num(g.rows_max_abs_diff)}; probe logits max |Δ| "
                    f"{_num(g.max_abs_logit_diff)}, top-1 agreement {_pct(g.top1_agreement)}; "
                    f"measured by running the adapter with peft {view.peft_version}: {view.disagreement}"
                )
                evidence.update(
                    max_abs_diff=g.rows_max_abs_diff,
                    max_abs_logit_diff=g.max_abs_logit_diff,
                    top1_agreement=g.top1_agreement,
                )
            evidence["peft"] = _peft_evidence(view, recorded.get(source))
            yield violation(
                f"the base ties {target} to {source}, but the adapted model uses different weights for them: "
                f"{_module(source)} {s_desc}, while {_module(target)} {t_desc} ({numbers}): the adapter trained an "
                "untied model",
                _config_location(ctx, target),
                evidence=evidence,
                fix=FixHint(
                    Applicability.MANUAL,
                    None,
                    "retrain with ensure_weight_tying=True to keep the tie, or untie the base before training",
                ),
            )


def _edit_words(ctx: AdapterContext, member: str, fc: GroupForecast | None, view: PeftView | None) -> str:
    """What the adapter does to a layer, from tieaudit's reading of it; without a forecast, what the file holds."""
    if fc is not None or view is None:
        return describe(ctx.edits.get(member))
    if member in view.in_file:
        kind = ctx.settings.peft_type + (", DoRA" if ctx.settings.use_dora else "")
        return f"is adapted ({kind}; not modelled by tieaudit, run with peft)"
    return "holds no adapter weights"


def _peft_evidence(view: PeftView | None, recorded: Recorded | None = None) -> dict[str, object] | None:
    """How peft judged the group: by running it here ("run", with why the shipped table could not answer) or in a
    run recorded in the shipped peft table ("recorded"); None: peft was not asked."""
    if view is not None:
        return {
            "version": view.peft_version,
            "agrees": view.agrees,
            "disagreement": view.disagreement,
            "by": "run",
            "not_recorded": view.not_recorded,
        }
    if recorded is not None:
        return {"version": recorded.peft_version, "agrees": True, "disagreement": None, "by": "recorded"}
    return None


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
def merge_corrupts_tied_weights(ctx: AdapterContext) -> Iterator[Violation]:
    reported = False
    meas = ctx.measured
    measured_text = (
        f" Measured with peft (--deep): logits max |Δ| {_num(meas.max_abs_logit_diff)} (logit scale "
        f"{_num(meas.logit_scale)}), top-1 agreement {_pct(meas.top1_agreement)}."
        if meas
        else ""
    )
    forecasts = {fc.source: fc for fc in ctx.forecasts}
    views = {v.source: v for v in ctx.peft}
    base = ctx.base or "BASE"
    fix = FixHint(Applicability.SAFE, f"tieaudit merge {ctx.path} --base {base} --output-dir MERGED_DIR")
    for source in [*forecasts, *(s for s in views if s not in forecasts)]:
        fc, view = forecasts.get(source), views.get(source)
        if fc is not None and (view is None or view.agrees):
            finding = _tie102_forecast(ctx, fc, view, measured_text, meas, fix)
        elif view is not None:
            # tieaudit merge merges what it models (and checks the result against peft); the rest stays unmerged
            unmerged = FixHint(
                Applicability.MANUAL,
                None,
                "keep the adapter unmerged (PeftModel.from_pretrained): tieaudit merge merges only LoRA adapters it "
                "models, and peft's own merge breaks this one",
            )
            finding = _tie102_peft(ctx, view, fix if fc is not None else unmerged)
        else:
            finding = None
        if finding is not None:
            reported = True
            yield finding
    if meas is not None and not reported and meas.max_abs_logit_diff > MEASURED_TOL * max(meas.logit_scale, 1.0):
        # reality wins over the forecast: the real merge changed the outputs
        yield violation(
            f"merging this adapter with PEFT and reloading changed the outputs although no tied weight was "
            f"forecast to change:{measured_text}",
            Location(file="adapter_config.json"),
            evidence={
                "measured": {
                    "max_abs_logit_diff": meas.max_abs_logit_diff,
                    "top1_agreement": meas.top1_agreement,
                    "logit_scale": meas.logit_scale,
                }
            },
            fix=FixHint(
                Applicability.MANUAL, None, "report this checkpoint to tieaudit: the forecast missed a mechanism"
            ),
        )


def _tie102_forecast(
    ctx: AdapterContext,
    fc: GroupForecast,
    view: PeftView | None,
    measured_text: str,
    meas: Measured | None,
    fix: FixHint,
) -> Violation | None:
    """TIE102 in tieaudit's own words: the forecast, confirmed by peft (or peft could not be asked)."""
    bad = fc.corrupted()
    if not bad:
        return None
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
    return violation(
        f"merging this adapter with PEFT and reloading would not reproduce it: {measured}. Why: {mechanisms}."
        f"{measured_text}",
        _config_location(ctx, worst),
        evidence={
            "source": fc.source,
            "members": list(fc.members),
            "corrupted": bad,
            "mechanisms": list(fc.mechanisms),
            "config_tied_after_merge": fc.config_tied_after_merge,
            "forecast": numbers,
            "peft": _peft_evidence(view, next((r for r in ctx.recorded if r.source == fc.source), None)),
            "measured": None
            if meas is None
            else {
                "max_abs_logit_diff": meas.max_abs_logit_diff,
                "top1_agreement": meas.top1_agreement,
                "logit_scale": meas.logit_scale,
            },
        },
        fix=fix,
    )


def _tie102_peft(ctx: AdapterContext, view: PeftView, fix: FixHint) -> Violation | None:
    """TIE102 from peft's own merge of the tied layers, where tieaudit's forecast disagrees or has nothing to say."""
    bad = view.corrupted()
    if not bad:
        return None
    numbers: dict[str, object] = {}
    if view.merge_error is not None or view.merged is None:
        worst = view.members[0]
        measured = f"peft's own merge path fails: {view.merge_error}"
    else:
        merged = view.merged

        def size(m: str) -> float:
            g = merged[m]
            return math.inf if g is None else g.max_abs_logit_diff

        worst = max(bad, key=size)
        g = merged[worst]
        if g is None:
            measured = f"{worst} would be randomly initialised"
        else:
            measured = (
                f"{worst} would change (probe rows max |Δ| {_num(g.rows_max_abs_diff)}; probe logits max |Δ| "
                f"{_num(g.max_abs_logit_diff)}, top-1 agreement {_pct(g.top1_agreement)})"
            )
        for m in bad:
            gm = merged[m]
            numbers[m] = (
                {"dropped": True}
                if gm is None
                else {
                    "max_abs_diff": gm.rows_max_abs_diff,
                    "max_abs_logit_diff": gm.max_abs_logit_diff,
                    "top1_agreement": gm.top1_agreement,
                }
            )
    return violation(
        f"merging this adapter with PEFT and reloading would not reproduce it: {measured}; measured by running "
        f"peft {view.peft_version}'s own merge_and_unload on the tied layers and reloading them as transformers "
        f"does ({view.disagreement})",
        _config_location(ctx, worst),
        evidence={
            "source": view.source,
            "members": list(view.members),
            "corrupted": bad,
            "config_tied_after_merge": view.config_tied_after_merge,
            "peft_measured": numbers,
            "peft": _peft_evidence(view),
        },
        fix=fix,
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
def tied_adapter_ignored(ctx: AdapterContext) -> Iterator[Violation]:
    if not ctx.settings.ensure_weight_tying:
        return
    for name, why in ctx.ignored:
        view = next((v for v in ctx.peft if name in v.members), None)
        if view is not None and name not in view.runtime_untied():
            continue  # peft's own run keeps this layer with its group: the file's weights are not lost
        fc = next((f for f in ctx.forecasts if name in f.members), None)
        recorded = fc is not None and any(r.source == fc.source for r in ctx.recorded)
        if view is None and fc is not None and recorded and name not in fc.runtime_untied():
            continue  # the same, from a recorded peft run that the forecast agreed with
        edit = ctx.edits[name]
        yield violation(
            f"the adapter was saved with ensure_weight_tying and holds weights for {_module(name)} "
            f"({describe(edit)}), but adapter_config.json does not name it and {why}: peft ignores those "
            "weights when loading, so the adapted model is not the one that was trained",
            Location(file="adapter_config.json", tensor=name, config_key="/target_modules"),
            evidence={"tensor": name, "edit": describe(edit), "reason": why},
            fix=FixHint(
                Applicability.MANUAL,
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
def adapter_base_mismatch(ctx: AdapterContext) -> Iterator[Violation]:
    for mm in ctx.mismatches:
        numbers = (
            f" (max |Δ| {_num(mm.max_abs_diff)}, relative {_num(mm.rel_diff)})" if mm.max_abs_diff is not None else ""
        )
        yield violation(
            f"{mm.param}: {mm.detail}{numbers}: the adapter was not trained on this base",
            Location(file="adapter_model.safetensors", tensor=mm.param),
            evidence={"tensor": mm.param, "kind": mm.kind, "max_abs_diff": mm.max_abs_diff, "rel_diff": mm.rel_diff},
            fix=FixHint(Applicability.MANUAL, None, "use the base the adapter was trained on (--base)"),
        )


@rule(
    code="TIE105",
    name="tied-adapter-unverified",
    severity=Severity.WARNING,
    family="adapter",
    summary="an adapter changes tied layers in a way neither tieaudit's model nor peft itself could check",
    explain="""
The adapter holds weights for (or its config names) a layer of a tied group of the base, but what it does to the
tie could not be checked: tieaudit does not model this adapter type or variant (LoKr, DoRA, ...), and peft itself
could not be asked (peft is run on the tied layers alone to check every adapter verdict, see `tieaudit.adapter.oracle`:
it was turned off with `--no-peft-check`, the tied weights are over its memory bound, or peft refuses the adapter).

A check that could not be done is not a pass: the adapted or merged model may untie or corrupt the pair (peft's
run-time model unties it for LoKr on an embedding, and its merge corrupts DoRA on a Gemma-3 embedding).

Fix: run the check where peft and torch are installed and without `--no-peft-check`; or check the adapter end to end
with `--deep`.
""",
)
def tied_adapter_unverified(ctx: AdapterContext) -> Iterator[Violation]:
    forecast = {fc.source for fc in ctx.forecasts}
    for members, why in ctx.unverified:
        modules = ", ".join(_module(m) for m in members)
        ours = (
            "tieaudit's own forecast is not confirmed"
            if members[0] in forecast
            else "tieaudit does not model this adapter"
        )
        yield violation(
            f"the adapter ({ctx.settings.peft_type}) touches the tied layers {modules}, but what it does to their tie "
            f"could not be checked: {ours}, and peft could not be asked ({why})",
            Location(file="adapter_config.json", tensor=members[0]),
            evidence={"members": list(members), "peft_type": ctx.settings.peft_type, "reason": why},
            fix=FixHint(
                Applicability.MANUAL,
                None,
                "run the check with peft installed and without --no-peft-check, or with --deep",
            ),
        )


@rule(
    code="TIE106",
    name="adapter-base-missing",
    severity=Severity.ERROR,
    family="adapter",
    summary="the adapter's base model could not be found, so its tie checks did not run",
    explain="""
Every adapter verdict (TIE101-TIE105) is a statement about the adapter *on its base*: which layers the base ties,
what peft's merge does to them, whether the adapter's saved base weights match. When the base cannot be found
(`base_model_name_or_path` names a directory that does not exist, or a Hub id that is not in the local Hugging Face
cache, and no `--base` was given), none of that can be checked, and a check that could not run must not look like a
pass: in CI without a model cache every adapter would otherwise pass.

What the adapter alone shows is reported: the class peft wrapped (`auto_mapping` in adapter_config.json), and the
layers the adapter changes that this class ties by declaration (e.g. a LoRA on `embed_tokens` of a class that ties
`lm_head` to it), which is exactly where a tied base breaks.

Fix: pass `--base BASE` (a local directory, or a Hub id already in the local cache: `hf download ORG/NAME`), or, to
check only what the adapter alone shows, `--no-base` (this finding then is info and the exit code ignores it).
""",
)
def adapter_base_missing(ctx: AdapterContext) -> Iterator[Violation]:
    alone = ctx.alone
    if alone is None:
        return
    arch = alone.architecture or "the base model class (unknown: adapter_config.json has no auto_mapping)"
    if alone.touched:
        pairs = ", ".join(f"{param} with {partner}" for param, partner in alone.touched)
        shows = (
            f"the adapter changes layers that {arch} ties by declaration, the case tied bases break on: {pairs}; "
            "whether this base ties them depends on its config"
        )
        if ctx.settings.ensure_weight_tying and alone.both_adapted:
            shows += (
                "; it was trained with ensure_weight_tying and holds LoRA factors for both layers of a pair: on a "
                "base that ties them, peft's merge adds the delta twice (TIE102)"
            )
    elif alone.ties_unavailable:
        shows = f"which layers the base ties is unknown too ({alone.ties_unavailable})"
    else:
        shows = f"the adapter changes no layer that {arch} ties by declaration"
    checked = (
        "checked the adapter alone (--no-base)" if not alone.required else "the tie checks TIE101-TIE105 did not run"
    )
    yield violation(
        f"the base model could not be found ({alone.reason}): {checked}; {shows}",
        Location(file="adapter_config.json", config_key="/base_model_name_or_path", line=_line(ctx)),
        severity=Severity.ERROR if alone.required else Severity.INFO,
        evidence={
            "base_model_name_or_path": alone.base_name,
            "architecture": alone.architecture,
            "touched": [list(pair) for pair in alone.touched],
            "required": alone.required,
        },
        fix=FixHint(
            Applicability.MANUAL,
            None,
            "pass --base BASE (a directory or a cached Hub id), or --no-base to check the adapter alone",
        ),
    )


def _line(ctx: AdapterContext) -> int | None:
    return ctx.adapter_config.line_of("/base_model_name_or_path") if ctx.adapter_config is not None else None


__all__ = ["differs"]
