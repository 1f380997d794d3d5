"""Rules TIE001-TIE006: model checkpoints (base or merged), judged as transformers loads them."""

from __future__ import annotations

import shlex
from collections.abc import Iterator

from tieaudit.checkpoint.config import get_pointer, literal
from tieaudit.model import Applicability, FixHint, Location, Severity, TieStatus
from tieaudit.rules.context import RuleContext
from tieaudit.rules.registry import Repair, Violation, rule, violation
from tieaudit.rules.wording import num as _num
from tieaudit.rules.wording import pct as _pct
from tieaudit.ties.graph import PairState, head_was_source
from tieaudit.ties.readers import READERS, Consequence, HeadState, ReaderView


def _as_loaded(pair: PairState) -> str:
    if pair.compared_as is None:
        return ""
    s, t = pair.source_info, pair.target_info
    stored = f"stored as {s.dtype} and {t.dtype}, " if (s and t and s.dtype != t.dtype) else ""
    return f"; {stored}compared in {pair.compared_as} as transformers loads them"


def _fix_command(ctx: RuleContext, mode: str, extra: str = "") -> str:
    return f"tieaudit fix {shlex.quote(ctx.path)} --{mode}{extra} --output-dir FIXED_DIR"


def _diverged_fix(ctx: RuleContext, pair: PairState) -> FixHint:
    pick = f" --unsafe-fixes --source {pair.target}"
    if pair.flag is not None and pair.flag.forced:
        return FixHint(
            Applicability.UNSAFE,
            _fix_command(ctx, "retie", pick),
            f"the config class forces the tie, so no config edit unties it: keep one tensor with --retie "
            f"--unsafe-fixes --source {pair.source} or {pair.target} (the other's values are discarded)",
        )
    return FixHint(
        Applicability.SAFE,
        _fix_command(ctx, "untie"),
        f"keep both trained tensors: untie the config ({pair.flag.pointer if pair.flag else 'tie_word_embeddings'} "
        f"false); or keep one with --retie{pick} (discards {pair.source})",
    )


def _stored_in(pair: PairState) -> dict[str, str | None]:
    return {
        pair.source: pair.source_info.file if pair.source_info else None,
        pair.target: pair.target_info.file if pair.target_info else None,
    }


@rule(
    code="TIE001",
    name="tied-weights-diverge",
    severity=Severity.ERROR,
    family="checkpoint",
    repair=Repair.PAIR,
    summary="the governing flag ties a pair, both tensors are stored, and they differ",
    explain="""
The config ties the pair (e.g. `tie_word_embeddings: true`), yet the checkpoint stores both tensors
with different values. transformers 5.x then loads them UNTIED with the warning "... both are present
in the checkpoints with different values, so we will NOT tie them", and keeps the config tied: the next
`tie_weights()` (called by `resize_token_embeddings`, some trainers, DeepSpeed ZeRO-3 init) silently
re-ties the pair and throws the stored target away. transformers 4.54-4.57 did that at load time.
Other loaders (vLLM, llama.cpp converters) may pick either tensor.

Typical cause: the head was trained or edited separately (untied in memory) and saved without
updating the config.

Fix: decide which model you meant. If both trained tensors matter, untie the config
(`tie_word_embeddings: false`), so every loader keeps both. If the model must be tied, drop the
target and keep the source (this discards the stored target: an unsafe fix).
""",
)
def tied_weights_diverge(ctx: RuleContext) -> Iterator[Violation]:
    for pair in ctx.graph.pairs:
        if not (pair.tied_by_config and pair.both_stored) or pair.shape_mismatch:
            continue
        if pair.diff is None or pair.diff.bitwise_equal:
            continue
        d = pair.diff
        flag = pair.flag.ref if pair.flag else "the model class"
        yield violation(
            f"{flag} ties {pair.target} to {pair.source}, but both are stored and differ "
            f"(max |Δ| {_num(d.max_abs_diff)}, relative {_num(d.rel_diff)}; probe logits: max |Δ| "
            f"{_num(d.max_abs_logit_diff)}, top-1 agreement {_pct(d.top1_agreement)}"
            f"{_as_loaded(pair)}): transformers loads them "
            f"untied with a warning, and the next tie_weights() overwrites {pair.target} with {pair.source}",
            ctx.flag_location(pair, tensor=pair.target),
            source=pair.source,
            target=pair.target,
            stored=_stored_in(pair),
            max_abs_diff=d.max_abs_diff,
            rel_diff=d.rel_diff,
            max_abs_logit_diff=d.max_abs_logit_diff,
            top1_agreement=d.top1_agreement,
            probe_tokens=ctx.probes,
            compared_as=pair.compared_as,
            dtypes={
                pair.source: pair.source_info.dtype if pair.source_info else None,
                pair.target: pair.target_info.dtype if pair.target_info else None,
            },
            fix=_diverged_fix(ctx, pair),
        )


@rule(
    code="TIE002",
    name="untied-weight-missing",
    severity=Severity.ERROR,
    family="checkpoint",
    repair=Repair.PAIR,
    summary="the pair is not tied by the governing flag and a tensor of it is absent: random init on load",
    explain="""
The governing flag does not tie the pair (`tie_word_embeddings: false`, or the tie is not declared
by the class), so every tensor of it must be stored, but one is absent. transformers initialises the
absent tensor randomly (std ≈ `initializer_range`, 0.02 for most models) and reports it only in a
warning-level "LOAD REPORT" (`lm_head.weight | MISSING`). The model loads and generates garbage.

Typical cause: the weights shared storage in memory (tied) while the config said untied, e.g.
`config.tie_word_embeddings = False` set after loading, or `from_pretrained(..., tie_word_embeddings=False)`
on a tied checkpoint: `save_pretrained` groups tensors by storage and drops the "duplicate", and
nothing in the file says so.

Fix: if the saved model was tied (the tensor was dropped because it shared storage), set the flag to
true, or store a copy of the source as the target and keep the flag false. If the tensor was really
trained separately, it is lost: re-save from the training run.
""",
)
def untied_weight_missing(ctx: RuleContext) -> Iterator[Violation]:
    init_range = ctx.config_value("initializer_range")
    for pair in ctx.graph.pairs:
        if pair.tied_by_config or pair.status is not TieStatus.MISSING:
            continue
        missing = [n for n, info in ((pair.target, pair.target_info), (pair.source, pair.source_info)) if not info]
        why = (
            (
                f"{pair.flag.ref} is {str(pair.flag.raw).lower()}"
                if pair.flag.raw is not None
                else f"{pair.flag.ref} is absent (default {str(pair.flag.value).lower()})"
            )
            if pair.flag
            else f"{ctx.graph.declared.architecture if ctx.graph.declared else 'the model class'} does not tie it"
        )
        std = f" (std ≈ initializer_range {init_range})" if isinstance(init_range, (int, float)) else ""
        flag_ptr = pair.flag.pointer if pair.flag else "tie_word_embeddings"
        evidence = head_was_source(pair)
        if pair.source_info and not pair.target_info and evidence:
            hint = (
                f"{evidence}, so {pair.target} was {pair.source} when saved: set {flag_ptr} to true, or store a "
                f"copy of {pair.source} as {pair.target}"
            )
            fix = FixHint(Applicability.SAFE, _fix_command(ctx, "untie"), hint)
        elif pair.source_info and not pair.target_info:
            hint = (
                f"nothing in the files shows what {pair.target} held (a .bin keeps tied tensors under both names, "
                f"and no safetensors metadata records a tie): if it was {pair.source}, --unsafe-fixes stores a copy "
                f"of it; if it was trained separately, re-save it from the model that has it"
            )
            fix = FixHint(Applicability.UNSAFE, _fix_command(ctx, "untie", " --unsafe-fixes"), hint)
        else:
            hint = "the tensor is lost: re-save it from the model that has it"
            fix = FixHint(Applicability.MANUAL, None, hint)
        yield violation(
            f"{why}, so {pair.target} is not tied to {pair.source}, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not stored: transformers initialises "
            f"{'it' if len(missing) == 1 else 'them'} randomly on load{std}",
            ctx.flag_location(pair, tensor=missing[0]),
            source=pair.source,
            target=pair.target,
            missing=missing,
            stored=_stored_in(pair),
            initializer_range=init_range,
            observed=list(pair.observed),
            saved_tied=evidence is not None,
            saved_tied_evidence=evidence,
            fix=fix,
        )


@rule(
    code="TIE003",
    name="tied-weights-missing",
    severity=Severity.ERROR,
    family="checkpoint",
    summary="the pair is tied and both tensors are absent",
    explain="""
The pair is tied, so one stored tensor is enough, but neither the source nor any target of the group
is stored. transformers warns "This checkpoint seem corrupted ... both are absent from the checkpoint"
and initialises the shared tensor randomly: embeddings and head are noise.

Typical cause: a conversion or filtering script dropped the embedding along with the "duplicate"
head, or shards were lost.

Fix: none from these files; the weights are gone. Re-export from the original model.
""",
)
def tied_weights_missing(ctx: RuleContext) -> Iterator[Violation]:
    for pair in ctx.graph.pairs:
        if not pair.tied_by_config or pair.status is not TieStatus.MISSING:
            continue
        yield violation(
            f"{pair.flag.ref if pair.flag else 'the model class'} ties {pair.target} to {pair.source}, but neither "
            f"is stored (nor any other tensor tied to {pair.source}): transformers reports a corrupted checkpoint "
            "and initialises them randomly",
            ctx.flag_location(pair, tensor=pair.source),
            source=pair.source,
            target=pair.target,
            stored=_stored_in(pair),
            fix=FixHint(
                Applicability.MANUAL, None, "the weights are not in these files: re-export from the original model"
            ),
        )


@rule(
    code="TIE004",
    name="tied-shape-mismatch",
    severity=Severity.ERROR,
    family="checkpoint",
    summary="a tied pair differs in shape (e.g. resized vocabulary), or a stored tensor of it does not fit the config",
    explain="""
Tensors of a tied pair must have one shape. (Different stored dtypes are compared the way
transformers compares them, after the cast to the load dtype: equal values are tied, different
values are TIE001.) Two cases:

- Both are stored with different shapes (typically a vocabulary resized on one side only).
  transformers never ties tensors that are not `torch.equal`, and rejects a stored shape the config
  does not build: loading fails with "size mismatch" (or, with `ignore_mismatched_sizes=True`, the
  tensor is re-initialised).
- A stored tensor of the pair does not have the shape the config builds (e.g. the embedding was
  resized but `vocab_size` was not updated): the same load failure.

Fix: make the config's `vocab_size` and both tensors agree (resize with `resize_token_embeddings`,
which keeps the tie, then save), or untie deliberately.
""",
)
def tied_shape_mismatch(ctx: RuleContext) -> Iterator[Violation]:
    for pair in ctx.graph.pairs:
        if pair.tied_by_config and pair.both_stored and pair.shape_mismatch:
            s, t = pair.source_info, pair.target_info
            assert s is not None and t is not None
            yield violation(
                f"{pair.flag.ref if pair.flag else 'the model class'} ties {pair.target} to {pair.source}, but their "
                f"shapes differ ({pair.source} {list(s.shape)} {s.dtype}, {pair.target} {list(t.shape)} {t.dtype}): "
                "transformers cannot load them as one tensor (size mismatch)",
                ctx.flag_location(pair, tensor=pair.target),
                source=pair.source,
                target=pair.target,
                shapes={pair.source: list(s.shape), pair.target: list(t.shape)},
                dtypes={pair.source: s.dtype, pair.target: t.dtype},
                stored=_stored_in(pair),
                fix=FixHint(
                    Applicability.MANUAL, None, "make both tensors and the config's vocab_size agree, or untie the pair"
                ),
            )
        for name, stored, expected in pair.expected_mismatch:
            if pair.shape_mismatch and pair.tied_by_config:
                continue  # already reported above, with both shapes
            yield violation(
                f"{name} is stored with shape {list(stored)}, but this config builds {list(expected)} "
                f"(tied with {pair.source if name == pair.target else pair.target}): transformers refuses to load it "
                "(size mismatch)",
                Location(file="config.json", tensor=name, config_key="/vocab_size", line=_line(ctx, "/vocab_size")),
                source=pair.source,
                target=pair.target,
                tensor=name,
                stored_shape=list(stored),
                expected_shape=list(expected),
                fix=FixHint(
                    Applicability.MANUAL, None, "update vocab_size (and the other tensor of the pair) to match"
                ),
            )


def _line(ctx: RuleContext, pointer: str) -> int | None:
    return ctx.config.line_of(pointer) if ctx.config is not None else None


@rule(
    code="TIE005",
    name="tie-flag-conflict",
    severity=Severity.WARNING,
    family="checkpoint",
    repair=Repair.CONFIG,
    summary="another reader decides the head's tie otherwise than transformers (named, with what it loads)",
    explain="""
transformers decides a tie by the `tie_word_embeddings` of the class that declares it. Other readers
of the same files decide differently in some checkpoints; tieaudit models them (docs/readers.md has
each one's source lines) and reports every one that disagrees, the flag it reads and what it would
load from this checkpoint's tensors. The severity follows that consequence:

- warning: a reader would serve wrong weights. vLLM 0.33 builds a composite model's language model
  from `text_config` when the top level has no flag, always ties Gemma2/Gemma3n/Cohere/LFM2/Zamba2/
  Whisper heads and never ties DeepseekV2/V3 heads: a head it discards or cannot find (an
  uninitialised head, no error) is garbage output there.
- info: nobody loads anything differently, e.g. accelerate reads `text_config` of Mistral 3, InternVL
  or Qwen3-VL-MoE but only logs a tied-weights warning; T5Config forces the flag true whatever
  config.json says, and every reader that parses it with transformers' config classes sees true.
- warning: the shard index (`*.index.json`) and the shards disagree about where a tied tensor is:
  transformers reads the shards, tools that trust the index see another checkpoint.

Fix: write the value transformers uses in every place a reader looks (`fix --retie`/`--untie`), and
regenerate the index from the shards. A class that ignores the flag in a reader cannot be fixed in
the config: keep it tied, or serve it with a reader that follows the flag.
""",
)
def tie_flag_conflict(ctx: RuleContext) -> Iterator[Violation]:
    if ctx.config is not None:
        yield from _flag_conflicts(ctx)
    members = {n for p in ctx.graph.pairs for n in (p.source, p.target)}
    disk = ctx.graph.disk_names
    disk_members = {disk.get(n, n) for n in members}
    for mm in ctx.index_mismatches:
        if mm.tensor not in disk_members:
            continue
        if mm.actual_file is None:
            state = f"the index places {mm.tensor} in {mm.indexed_file}, but no shard holds it"
        elif mm.indexed_file is None:
            state = f"{mm.actual_file} holds {mm.tensor}, but the index does not list it"
        else:
            state = f"the index places {mm.tensor} in {mm.indexed_file}, but it is in {mm.actual_file}"
        yield violation(
            f"{ctx.index_file}: {state}; transformers reads the shards, tools that trust the index see another "
            "checkpoint",
            Location(file=ctx.index_file, tensor=mm.tensor),
            tensor=mm.tensor,
            indexed_file=mm.indexed_file,
            actual_file=mm.actual_file,
            fix=FixHint(Applicability.SAFE, _fix_command(ctx, "untie"), "regenerate the index from the shards"),
        )


def _flag_conflicts(ctx: RuleContext) -> Iterator[Violation]:
    assert ctx.config is not None
    seen: set[str] = set()
    for pair in ctx.graph.pairs:
        flag = pair.flag
        if flag is None or flag.pointer in seen:
            continue
        seen.add(flag.pointer)
        if flag.raw is not None and flag.raw != flag.value:
            arch = ctx.graph.declared.architecture if ctx.graph.declared else "the model class"
            yield violation(
                f"config.json:{flag.pointer} is {str(flag.raw).lower()}, but {arch}'s config class forces it to "
                f"{str(flag.value).lower()}: transformers {'ties' if flag.value else 'unties'} {pair.target} and "
                f"{pair.source}, and so does every reader that parses config.json with transformers' config classes "
                "(accelerate, vLLM); only a tool reading the raw JSON key sees the opposite",
                ctx.flag_location(pair, tensor=pair.target),
                severity=Severity.INFO,
                pointer=flag.pointer,
                raw=flag.raw,
                effective=flag.value,
                fix=FixHint(
                    Applicability.SAFE,
                    _fix_command(ctx, "retie" if flag.value else "untie"),
                    f"write {str(flag.value).lower()} at {flag.pointer}, keeping what transformers computes",
                ),
            )
    yield from _reader_conflicts(ctx)


def _reader_conflicts(ctx: RuleContext) -> Iterator[Violation]:
    """Readers (tieaudit.ties.readers) that decide the output head's tie otherwise than transformers: one finding per
    config key they read (and one for readers that ignore the flag), naming each reader, what it reads and what it
    would load from this checkpoint's tensors; the severity is the worst consequence."""
    declared = ctx.graph.declared
    assert ctx.config is not None
    if declared is None or declared.head is None:
        return
    pair = next((p for p in ctx.graph.pairs if p.target == declared.head and p.flag is not None), None)
    if pair is None or pair.flag is None:
        return
    flag = pair.flag
    stored = [i for i in (pair.source_info, pair.target_info) if i is not None]
    state = HeadState(
        head=pair.target,
        embedding=pair.source,
        head_stored=pair.target_info is not None,
        equal=pair.diff.bitwise_equal if pair.diff is not None else None,
        safetensors=bool(stored) and all(i.file.endswith(".safetensors") for i in stored),
    )
    groups: dict[str | None, list[tuple[ReaderView, Consequence]]] = {}
    for view in declared.readers:
        reader = READERS.get(view.reader)
        if reader is None or view.value == flag.value:
            continue
        groups.setdefault(None if view.forced else view.pointer, []).append((view, reader.consequence(view, state)))
    governing = f"{flag.pointer} ({literal(flag.value)}{', absent: the default' if flag.raw is None else ''})"
    verb = "ties" if flag.value else "does not tie"
    for pointer, found in groups.items():
        effects = "; ".join(f"{READERS[v.reader].name} {READERS[v.reader].verified} {c.text}" for v, c in found)
        if pointer is None:
            lead = f"transformers follows {governing} and {verb} {pair.target} to {pair.source}, but"
            key = flag.pointer
            hint = FixHint(
                Applicability.MANUAL, None, "serve this model with a reader that follows the flag, or keep it tied"
            )
        else:
            raw = get_pointer(ctx.config.data, pointer)
            seen = f"{literal(found[0][0].value)}{' (absent: the config class default)' if raw is None else ''}"
            lead = (
                f"config.json:{pointer} is {seen}, but transformers follows {governing} and {verb} {pair.target} "
                f"to {pair.source}:"
            )
            key = pointer
            hint = FixHint(
                Applicability.SAFE,
                _fix_command(ctx, "retie" if flag.value else "untie"),
                f"write {literal(flag.value)} at {pointer} and {flag.pointer}",
            )
        yield violation(
            f"{lead} {effects}",
            Location(file="config.json", tensor=pair.target, config_key=key, line=ctx.config.line_of(key)),
            severity=max((c.severity for _, c in found), key=lambda s: s.rank),
            pointer=key,
            value=found[0][0].value,
            governing_pointer=flag.pointer,
            governing_value=flag.value,
            readers=[
                {
                    "reader": v.reader,
                    "verified": READERS[v.reader].verified,
                    "pointer": v.pointer,
                    "value": v.value,
                    "ignores_flag": v.forced,
                    "severity": c.severity.value,
                    "consequence": c.text,
                }
                for v, c in found
            ],
            fix=hint,
        )


@rule(
    code="TIE006",
    name="redundant-tied-copy",
    severity=Severity.INFO,
    family="checkpoint",
    repair=Repair.PAIR,
    summary="tied, both stored, bitwise equal",
    explain="""
The pair is tied and both tensors are stored as separate, bitwise-equal copies. transformers loads
them tied, so the model is correct, but the file carries a redundant copy (for a Llama-3.2-1B head,
500 MB in bf16), and a later edit of one copy turns this into TIE001.

Fix: drop the stored target; transformers re-ties it from the source on load.
""",
)
def redundant_tied_copy(ctx: RuleContext) -> Iterator[Violation]:
    for pair in ctx.graph.pairs:
        if not (pair.tied_by_config and pair.both_stored and pair.diff and pair.diff.bitwise_equal):
            continue
        s, t = pair.source_info, pair.target_info
        assert s is not None and t is not None
        if s.storage_id is not None and s.storage_id == t.storage_id:
            continue  # one storage under two names (a pickled tied model): no extra bytes
        yield violation(
            f"{pair.target} is stored as a bitwise-equal copy of {pair.source} ({t.nbytes:,} redundant bytes); "
            "transformers loads them tied",
            ctx.flag_location(pair, tensor=pair.target),
            source=pair.source,
            target=pair.target,
            redundant_bytes=t.nbytes,
            stored=_stored_in(pair),
            fix=FixHint(Applicability.SAFE, _fix_command(ctx, "retie"), f"drop {pair.target} from the weights"),
        )
