"""TIE21x: training checkpoints of nanoGPT and llama2.c (``ckpt.pt``), whose ``model.py`` ties the embedding to the
head unconditionally (`tieaudit.formats.torch_ckpt`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tieaudit.formats.torch_ckpt import CkptContext
from tieaudit.model import Applicability, FixHint, Location, Severity
from tieaudit.rules.registry import Violation, rule, violation
from tieaudit.rules.wording import num as _num


def _where(ctx: CkptContext, tensor: str) -> Location:
    return Location(file=Path(ctx.path).name, tensor=f"model/{tensor}")


@rule(
    code="TIE211",
    name="ckpt-tied-weights-diverge",
    severity=Severity.ERROR,
    family="torch-ckpt",
    summary="a nanoGPT or llama2.c checkpoint stores its tied embedding and head apart, with different values",
    explain="""
nanoGPT's and llama2.c's `model.py` tie the token embedding to the head unconditionally
(`self.transformer.wte.weight = self.lm_head.weight`; `self.tok_embeddings.weight =
self.output.weight`), and `torch.save` keeps the tie: the two keys of the state dict share one
storage. Here they are two tensors with different values (the model was untied for training, or the
state dict was edited). Loading it (`train.py` resume, `sample.py`, llama2.c's `export.py`) copies
both keys into the one tied Parameter, in the state dict's order: the later key wins and the other
tensor's trained values are silently lost.

Fix: decide which matrix the model should use, and either keep the tie (store one value under both
keys) or untie the model in `model.py` before loading.
""",
)
def ckpt_tied_weights_diverge(ctx: CkptContext) -> Iterator[Violation]:
    if len(ctx.stored) != 2 or ctx.shared or ctx.equal is not False:
        return
    p = ctx.project
    lost = p.embedding if ctx.later == p.head else p.head
    yield violation(
        f"{p.name}'s model.py ties {p.embedding} to {p.head}, but this checkpoint stores them apart with different "
        f"values (max |Δ| {_num(ctx.max_abs_diff)}): load_state_dict copies both into the one tied Parameter and "
        f"{ctx.later} (the later key) wins, so the trained {lost} is lost",
        _where(ctx, lost),
        evidence={"project": p.name, "tie": p.source, "max_abs_diff": ctx.max_abs_diff, "wins": ctx.later},
        fix=FixHint(Applicability.MANUAL, None, "keep one matrix under both keys, or untie the model before loading"),
    )


@rule(
    code="TIE212",
    name="ckpt-tied-weight-missing",
    severity=Severity.ERROR,
    family="torch-ckpt",
    summary="a nanoGPT or llama2.c checkpoint lacks one key of its tied embedding and head",
    explain="""
nanoGPT's and llama2.c's `model.py` tie the token embedding to the head, and their loaders
(`train.py` resume and `sample.py` in nanoGPT, `train.py` resume in llama2.c) call
`model.load_state_dict(state_dict)` strictly: a checkpoint that lacks one of the two keys (a
"deduplicated" state dict, or one converted from a tied format) does not load ("Missing key(s) in
state_dict").

Fix: store the one matrix under both keys (they are one Parameter in the model).
""",
)
def ckpt_tied_weight_missing(ctx: CkptContext) -> Iterator[Violation]:
    p = ctx.project
    missing = [n for n in (p.embedding, p.head) if n not in ctx.stored]
    if not missing:
        return
    yield violation(
        f"{p.name}'s model.py ties {p.embedding} to {p.head}, but the checkpoint has no {' and no '.join(missing)}: "
        "a strict load_state_dict (train.py resume, sample.py) raises Missing key(s)",
        _where(ctx, missing[0]),
        severity=Severity.ERROR,
        evidence={"project": p.name, "tie": p.source, "missing": missing},
        fix=FixHint(Applicability.MANUAL, None, "store the one matrix under both keys"),
    )
