"""TIE221-TIE222: llama2.c's exported model files (`tieaudit.formats.llama2c`): the file's shared-classifier flag
against what the file holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tieaudit.formats.llama2c import Llama2cContext
from tieaudit.model import Applicability, FixHint, Location, Severity
from tieaudit.rules.registry import Violation, rule, violation

EXPORT = "python export.py OUT.bin --version {v} --checkpoint ckpt.pt"


def _where(ctx: Llama2cContext) -> Location:
    return Location(file=Path(ctx.path).name, tensor="output")


@rule(
    code="TIE221",
    name="llama2c-classifier-ignored",
    severity=Severity.ERROR,
    family="llama2c",
    summary="a llama2.c model file says its classifier is the token embedding, but also holds a classifier",
    explain="""
llama2.c's `export.py` writes the classifier (`output`, the head) after the other weights only when
it differs from the token embedding, and says so in the header: v0 by a negative vocab_size, v1 and
v2 by a `shared_classifier` byte. This file says shared, yet its size is that of a file that holds a
classifier: `run.c` (v0) and `runq.c` (v2) use the token embedding as the head and never read the
trained classifier at the end of the file. The flag was edited, or the file was written by another
tool.

Fix: export again from the checkpoint (`python export.py OUT.bin --version N --checkpoint
ckpt.pt`), which decides the flag from the weights themselves.
""",
)
def llama2c_classifier_ignored(ctx: Llama2cContext) -> Iterator[Violation]:
    if not ctx.shared or not ctx.holds_classifier:
        return
    yield violation(
        f"the v{ctx.version} header says the classifier is the token embedding (shared), but the file holds "
        f"{ctx.classifier_bytes} more bytes: a classifier after the other weights, which run.c never reads: the "
        "model runs with its embedding as the head",
        _where(ctx),
        evidence={"version": ctx.version, "size": ctx.size, "classifier_bytes": ctx.classifier_bytes},
        fix=FixHint(Applicability.MANUAL, EXPORT.format(v=ctx.version), "export again from the checkpoint"),
    )


@rule(
    code="TIE222",
    name="llama2c-classifier-missing",
    severity=Severity.ERROR,
    family="llama2c",
    summary="a llama2.c model file says its classifier is stored, but the file ends before it",
    explain="""
The header says the classifier is not shared (v0: a negative vocab_size; v1 and v2: a zero
`shared_classifier` byte), so `run.c` takes the head from the bytes after the other weights; this
file ends where those weights end. run.c checks no size: it reads past the end of the mapping (a
crash, or garbage logits).

Fix: export again from the checkpoint (`python export.py OUT.bin --version N --checkpoint ckpt.pt`).
""",
)
def llama2c_classifier_missing(ctx: Llama2cContext) -> Iterator[Violation]:
    if ctx.shared or ctx.holds_classifier:
        return
    yield violation(
        f"the v{ctx.version} header says the classifier is stored apart (not shared), but the file ends with the "
        f"other weights ({ctx.size} bytes, {ctx.classifier_bytes} short): run.c reads the head past the end of the "
        "file",
        _where(ctx),
        evidence={"version": ctx.version, "size": ctx.size, "classifier_bytes": ctx.classifier_bytes},
        fix=FixHint(Applicability.MANUAL, EXPORT.format(v=ctx.version), "export again from the checkpoint"),
    )
