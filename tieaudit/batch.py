"""Many checkpoints in one run: `tieaudit check DIR1 DIR2 ...` and the `checkpoint-*` folders a trainer writes.

`expand_targets` turns the PATH arguments into targets (file-system inspection only, no weights read);
`collect` audits each with the function it is given and gathers one `BatchReport`: a target that cannot be
audited becomes a `TargetError` (its message and exit code) and the others still run, as ruff does with a file
it cannot read. `audit_many` is the Python API over both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from tieaudit._version import __version__
from tieaudit.auditing import audit, severity
from tieaudit.errors import TieauditError, UsageError
from tieaudit.model import BatchReport, Report, Severity, TargetError

# what makes a directory a checkpoint by itself (a trainer's output_dir holds only training_args.bin and
# checkpoint-* folders until save_model writes the final model into it)
_CHECKPOINT_MARKERS = (
    "config.json",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_STEP = re.compile(r"checkpoint-(\d+)")


def trainer_checkpoints(directory: str) -> list[str]:
    """The `checkpoint-<step>` sub-directories of a trainer's output directory, by step (checkpoint-500 before
    checkpoint-1000), as `directory/checkpoint-N`. Symlinked sub-directories are ignored (not followed)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _STEP.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            found.append((int(match.group(1)), entry.name))
    return [os.path.join(directory, name) for _, name in sorted(found)]


def is_checkpoint_dir(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in _CHECKPOINT_MARKERS)


def run_files(directory: str) -> list[str]:
    """The model files of a training run's output directory that is not itself a checkpoint directory (nanoGPT's or
    llama2.c's ``out/``): its files that are nanoGPT or llama2.c training checkpoints or llama2.c model files, by
    their content (a zip ``torch.save`` archive; a llama2.c header whose sizes fit), by name."""
    if not os.path.isdir(directory) or is_checkpoint_dir(directory):
        return []
    from tieaudit.formats.llama2c import sniff  # lazy: only for a directory that is not a checkpoint
    from tieaudit.formats.torch_ckpt import is_training_checkpoint  # lazy: as above

    try:
        entries = sorted(e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False))
    except OSError:
        return []
    paths = [os.path.join(directory, name) for name in entries]
    return [p for p in paths if is_training_checkpoint(p) or sniff(p)]


def expand_targets(paths: Sequence[str]) -> list[str]:
    """Each PATH as given, except a directory holding `checkpoint-*` folders: it stands for itself when it is a
    checkpoint too (the trainer's final model), followed by its checkpoints by step; and a training run's output
    directory that is not a checkpoint (nanoGPT, llama2.c): it stands for its model files. Duplicates are dropped."""
    targets: list[str] = []
    for path in paths:
        found = (trainer_checkpoints(path) or run_files(path)) if os.path.isdir(path) else []
        if not found or is_checkpoint_dir(path):
            targets.append(path)
        targets.extend(found)
    seen: set[str] = set()
    unique = []
    for t in targets:
        key = os.path.realpath(t) if os.path.exists(t) else t
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


def is_batch(paths: Sequence[str]) -> bool:
    """A batch document when more than one PATH was given or a PATH is a trainer's output directory (it holds
    `checkpoint-<step>` folders): the shape of the output never depends on how many checkpoints a run has saved."""
    return len(paths) > 1 or any(os.path.isdir(p) and (trainer_checkpoints(p) or run_files(p)) for p in paths)


def collect(
    targets: Sequence[str],
    audit_one: Callable[[str], Report],
    *,
    fail_on: Severity = Severity.WARNING,
    on_error: Callable[[TargetError], None] | None = None,
) -> BatchReport:
    """Audit every target with `audit_one`; a `TieauditError` becomes that target's `TargetError` (reported through
    `on_error` as it happens) and the batch goes on (usage errors that concern every target, such as an unknown
    rule selector, are checked before the batch starts). An internal error is a bug: it ends the batch."""
    items: list[Report | TargetError] = []
    for target in targets:
        try:
            items.append(audit_one(target))
        except TieauditError as exc:
            error = TargetError(path=target, message=exc.message, exit_code=exc.exit_code)
            if on_error is not None:
                on_error(error)
            items.append(error)
    return BatchReport(tool_version=__version__, items=tuple(items), fail_on=fail_on)


def audit_many(paths: Sequence[str | os.PathLike[str]], **audit_kwargs: Any) -> BatchReport:
    """Audit several checkpoints (a directory of `checkpoint-*` folders counts as its checkpoints) with
    `tieaudit.audit(path, **audit_kwargs)` each; returns one `BatchReport` whose `exit_code` is the worst."""

    if not paths:
        raise UsageError("audit_many needs at least one path")
    fail_on = severity(audit_kwargs.get("fail_on", Severity.WARNING))
    targets = expand_targets([os.fspath(p) for p in paths])
    return collect(targets, lambda t: audit(t, **audit_kwargs), fail_on=fail_on)
