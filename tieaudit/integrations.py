"""Training integrations: a transformers `TrainerCallback` that watches the weight tying of the model being trained,
and `assert_tied(model)` for custom loops.

Both judge the live model with `audit_model`: tensors are grouped by storage (so a PEFT-wrapped layer or a view
that shares memory counts as tied), and the model is judged as `save_pretrained` -> `from_pretrained` would leave
it. A tie is *broken* when a group that was tied (one shared tensor, or equal copies) at the baseline is now
diverged or missing: the saved checkpoint would load a different model than the one trained (TIE001/TIE002).

    from tieaudit.integrations import TieAuditCallback, assert_tied
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[TieAuditCallback(on_break="raise")])
    assert_tied(model)  # in a custom loop, e.g. before model.save_pretrained(...)

Importing this module imports transformers (the callback subclasses `TrainerCallback`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from tieaudit.errors import TieauditError
from tieaudit.live import audit_model
from tieaudit.model import Finding, Report, Severity, TieStatus

logger = logging.getLogger("tieaudit")

ON_BREAK = ("warn", "raise")


class TieBrokenError(TieauditError, AssertionError):
    """The model's weight tying is broken (a tie it had is gone, or a tie error is present)."""


@dataclass(frozen=True)
class TieState:
    """The tie groups of a live model at one moment: (source, targets) -> status, and the error findings."""

    statuses: dict[tuple[str, tuple[str, ...]], TieStatus]
    errors: tuple[Finding, ...]

    @classmethod
    def of(cls, model: Any) -> TieState:
        report = audit_model(model, probe_tokens=0)
        return cls({(g.source, g.targets): g.status for g in report.groups}, _errors(report))

    def broken_since(self, baseline: TieState) -> list[str]:
        """What was tied at `baseline` and is not now, in words."""
        out = []
        for key, before in baseline.statuses.items():
            now = self.statuses.get(key)
            if before is TieStatus.TIED and now in (TieStatus.DIVERGED, TieStatus.MISSING):
                out.append(f"{', '.join(key[1])} -> {key[0]} was tied and is now {now.value}")
        return out


def _errors(report: Report) -> tuple[Finding, ...]:
    return tuple(f for f in report.findings if f.severity is Severity.ERROR)


def assert_tied(model: Any) -> Report:
    """Raise `TieBrokenError` (an AssertionError) when the model, saved now, would not load as it is: a tie error
    (TIE001 diverged, TIE002 missing, ...). Returns the report otherwise."""
    report = audit_model(model, probe_tokens=0)
    errors = _errors(report)
    if errors:
        raise TieBrokenError("; ".join(f"{f.code} {f.message}" for f in errors))
    return report


class TieAuditCallback(TrainerCallback):
    """Audits the model's weight tying when training begins and after every checkpoint save.

    ``on_break="warn"`` (default) logs a warning on the ``tieaudit`` logger when a tie the model had at the start
    is broken (or a tie error appears); ``"raise"`` raises `TieBrokenError`, which stops the Trainer. The results
    of every audit are kept in ``self.history`` as (global step, event, TieState)."""

    def __init__(self, on_break: str = "warn") -> None:
        if on_break not in ON_BREAK:
            raise ValueError(f"on_break must be one of {ON_BREAK}, got {on_break!r}")
        self.on_break = on_break
        self.baseline: TieState | None = None
        self.history: list[tuple[int, str, TieState]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        self.baseline = TieState.of(model)
        self.history.append((state.global_step, "train_begin", self.baseline))
        if self.baseline.errors:
            self._report("at the start of training", [f"{f.code} {f.message}" for f in self.baseline.errors])

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        current = TieState.of(model)
        self.history.append((state.global_step, "save", current))
        if self.baseline is None:
            self.baseline = current
            return
        problems = current.broken_since(self.baseline)
        known = {(f.code, f.location.tensor) for f in self.baseline.errors}
        problems += [f"{f.code} {f.message}" for f in current.errors if (f.code, f.location.tensor) not in known]
        if problems:
            self._report(f"at the checkpoint of step {state.global_step}", problems)

    def _report(self, when: str, problems: list[str]) -> None:
        message = f"tieaudit: weight tying broken {when}: " + "; ".join(problems)
        if self.on_break == "raise":
            raise TieBrokenError(message)
        logger.warning(message)
