"""Orchestration: open the checkpoint, build the tie graph, run the rules, assemble the report."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tieaudit._version import __version__
from tieaudit.adapter.forecast import METHODS as FORECAST_METHODS
from tieaudit.checkpoint import open_checkpoint
from tieaudit.checkpoint.hub import resolve
from tieaudit.errors import UsageError
from tieaudit.model import (
    Comparison,
    Finding,
    Progress,
    Report,
    Severity,
    Skipped,
    Stats,
    Target,
    TieGroup,
    TieStatus,
)
from tieaudit.rules import RuleContext, selected, unknown_selectors
from tieaudit.rules import run as run_rules
from tieaudit.threads import numeric_threads
from tieaudit.ties.declared import architecture_of
from tieaudit.ties.graph import checkpoint_graph

if TYPE_CHECKING:
    from tieaudit.adapter.analysis import AdapterAnalysis
    from tieaudit.adapter.context import AdapterContext
    from tieaudit.checkpoint import Checkpoint
    from tieaudit.rules import RuleContext
    from tieaudit.rules.registry import Rule
    from tieaudit.ties.graph import TieGraph


def severity(value: str | Severity) -> Severity:
    try:
        return value if isinstance(value, Severity) else Severity(str(value).lower())
    except ValueError:
        raise UsageError(f"invalid fail-on level {value!r}: use error, warning or info") from None


def check_selectors(select: Sequence[str] | None, ignore: Sequence[str] | None) -> None:
    """UsageError for a `--select`/`--ignore` value that names no rule."""

    bad = unknown_selectors([*(select or []), *(ignore or [])])
    if bad:
        raise UsageError(f"unknown rule selector {bad[0]!r}: see `tieaudit rules`")


def _gib(value: float | None) -> int | None:
    """--peft-max-memory GiB -> bytes (None: the oracle's default bound)."""
    if value is None:
        return None
    if not value > 0:
        raise UsageError(f"--peft-max-memory must be a positive number of GiB, not {value}")
    return int(value * 2**30)


def audit(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    fail_on: str | Severity = Severity.WARNING,
    exit_zero: bool = False,
    probe_tokens: int = 64,
    progress: Progress | None = None,
    deep: bool = False,
    revision: str | None = None,
    peft_check: bool = True,
    peft_max_memory: float | None = None,
    require_base: bool = True,
    forecast: str = "auto",
    against: str | os.PathLike[str] | None = None,
) -> Report:
    """Audit a checkpoint directory (or a Hub repo id in the local Hugging Face cache, at ``revision``), or a GGUF
    file, and return the report (never writes anything, never downloads).

    ``against``: for a GGUF file, the Hugging Face checkpoint it was converted from (its head is compared).

    ``forecast`` chooses how an adapter's merge is forecast: "auto" (the low-rank path unless the adapter holds full
    module copies), "lowrank", or "stream" (materialises every weight in chunks: slower, the reference the low-rank
    path is tested against); the verdicts are the same.

    Raises `TieauditError` subclasses for unreadable input (exit 2) or nothing to audit (exit 3).
    """

    started = time.perf_counter()
    fail_level = severity(fail_on)
    check_selectors(select, ignore)
    if probe_tokens < 0:
        raise UsageError(f"probe_tokens must be >= 0, got {probe_tokens}")

    if forecast not in FORECAST_METHODS:
        raise UsageError(f"forecast must be one of {', '.join(FORECAST_METHODS)}, got {forecast!r}")
    rules = selected(select, ignore)
    if against is not None and not is_format_file(path):
        raise UsageError("--against is for GGUF files: PATH is not one")
    if base is None and against is None and _is_training_checkpoint(path):
        return audit_training_checkpoint(
            os.fspath(path), AuditOptions(rules=tuple(rules), fail_on=fail_level, exit_zero=exit_zero), started
        )
    if base is None and against is None and _is_llama2c(path):
        return audit_llama2c(
            os.fspath(path), AuditOptions(rules=tuple(rules), fail_on=fail_level, exit_zero=exit_zero), started
        )
    if is_format_file(path):
        return audit_gguf(
            os.fspath(path),
            None if base is None else os.fspath(base),
            None if against is None else os.fspath(against),
            AuditOptions(rules=tuple(rules), fail_on=fail_level, exit_zero=exit_zero),
            started,
        )
    where = resolve(path, revision)

    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(where.path))
        options = AuditOptions(
            rules=tuple(rules),
            fail_on=fail_level,
            exit_zero=exit_zero,
            probe_tokens=probe_tokens,
            deep=deep,
            peft_check=peft_check,
            peft_max_bytes=_gib(peft_max_memory),
            require_base=require_base,
            forecast=forecast,
        )
        report, _ = audit_open(ckpt, where.path, base, options, stack, started, progress)
    if where.repo is not None:
        report = dataclasses.replace(report, target=dataclasses.replace(report.target, repo=where.repo))
    return report


@dataclass(frozen=True)
class AuditOptions:
    """How to audit one checkpoint: which rules, the exit policy, how deep to measure, and the adapter checks."""

    rules: tuple[Rule, ...]
    fail_on: Severity = Severity.WARNING
    exit_zero: bool = False
    probe_tokens: int = 64  # seeded probe states for logit comparisons (0: weights only)
    deep: bool = False  # --deep: measure adapter merges with transformers and peft
    peft_check: bool = True  # hold adapter verdicts to peft itself
    peft_max_bytes: int | None = None  # the peft check's memory bound (None: its default)
    require_base: bool = True  # an adapter whose base cannot be found is an error (TIE106)
    forecast: str = "auto"  # the adapter merge forecast's method ("stream": the reference path, slower)


def audit_open(
    ckpt: Checkpoint,
    path: str,
    base: str | os.PathLike[str] | None,
    options: AuditOptions,
    stack: contextlib.ExitStack,
    started: float,
    progress: Progress | None = None,
) -> tuple[Report, TieGraph | None]:
    """Audit an open checkpoint; also returns the tie graph of a model checkpoint (for `fix`)."""
    skipped: list[Skipped] = []

    findings: list[Finding]
    model_graph: TieGraph | None = None
    if ckpt.kind == "adapter":
        from tieaudit.adapter.analysis import AdapterOptions, analyse_adapter  # lazy: only for adapters

        if progress and options.peft_check:
            progress("reading the adapter against its base (and asking peft)", 0, 0)
        base_arg = None if base is None else str(base)
        adapter_options = AdapterOptions(
            options.probe_tokens, options.peft_check, options.peft_max_bytes, options.require_base, options.forecast
        )
        with numeric_threads():  # BLAS sized to the CPUs nobody else is using (tieaudit/threads.py)
            analysis = analyse_adapter(ckpt, path, base_arg, adapter_options, stack)
        skipped.extend(analysis.skipped)
        context = analysis.context
        extra: list[Comparison] = []
        if options.deep:
            context, extra = _deep(context, analysis, Path(ckpt.root), skipped, progress)
        findings = run_rules(options.rules, context)
        graph = analysis.context.graph
        groups = graph.groups if graph else ()
        comparisons = (*analysis.comparisons, *extra)
        base_used = str(analysis.base_path) if analysis.base_path else None
        base_stats = analysis.base_stats
        arch = analysis.architecture
    else:
        if base is not None:
            raise UsageError("--base is for adapters; PATH is a model checkpoint")
        if options.deep:
            skipped.append(
                Skipped(
                    "deep",
                    "--deep measures adapter merges with peft; a model checkpoint is "
                    "judged from its files, as transformers would load them",
                )
            )
        model_graph, model_context = _analyse(ckpt, path, options.probe_tokens, progress, skipped)
        findings = run_rules(options.rules, model_context)
        groups, comparisons, base_used, base_stats = model_graph.groups, model_graph.comparisons, None, None
        arch = model_graph.declared.architecture if model_graph.declared else _arch_name(ckpt)
    read = [ckpt.stats] if base_stats is None else [ckpt.stats, base_stats]
    stats = Stats(
        header_bytes_read=sum(r.header_bytes for r in read),
        tensor_bytes_read=sum(r.tensor_bytes for r in read),
        seconds=round(time.perf_counter() - started, 3),
    )
    target = Target(
        path=path,
        kind=ckpt.kind,
        base=base_used,
        layout=ckpt.layout,
        files=tuple(ckpt.files),
        architecture=arch,
    )
    report = Report(
        tool_version=__version__,
        target=target,
        groups=tuple(groups),
        comparisons=tuple(comparisons),
        findings=tuple(findings),
        skipped=tuple(skipped),
        fail_on=options.fail_on,
        exit_zero=options.exit_zero,
        stats=stats,
    )
    return report, model_graph


def is_format_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file in a format beyond checkpoint directories (GGUF, by its magic)."""
    from tieaudit.formats.gguf_header import MAGIC  # lazy: only for a path that is a file

    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _is_training_checkpoint(path: str | os.PathLike[str]) -> bool:
    from tieaudit.formats.torch_ckpt import is_training_checkpoint  # lazy: only for a path that is a file

    return is_training_checkpoint(path)


def _is_llama2c(path: str | os.PathLike[str]) -> bool:
    from tieaudit.formats.llama2c import sniff  # lazy: only for a path that is a file

    return sniff(path)


def audit_llama2c(path: str, options: AuditOptions, started: float) -> Report:
    """Audit a llama2.c model file (tieaudit.formats.llama2c): its shared-classifier flag against its size."""
    from tieaudit.formats.llama2c import read_llama2c  # lazy: only for llama2.c files

    ctx = read_llama2c(path)
    findings = run_rules(options.rules, ctx)
    name = Path(path).name
    if ctx.shared:
        status = TieStatus.DIVERGED if ctx.holds_classifier else TieStatus.TIED
    else:
        status = TieStatus.UNTIED if ctx.holds_classifier else TieStatus.MISSING
    flag = "header: vocab_size sign" if ctx.version == 0 else "header: shared_classifier"
    group = TieGroup(
        source="tok_embeddings",
        targets=("output",),
        declared=True,
        governing_flag=f"llama2.c v{ctx.version} {flag}",
        flag_value=ctx.shared,
        tied_by_config=ctx.shared,
        stored={"tok_embeddings": name, "output": name if ctx.holds_classifier else None},
        disk_names={},
        status=status,
    )
    return Report(
        tool_version=__version__,
        target=Target(path=path, kind="model", base=None, layout=f"llama2.c v{ctx.version}", files=(name,)),
        groups=(group,),
        comparisons=(),
        findings=tuple(findings),
        skipped=(),
        fail_on=options.fail_on,
        exit_zero=options.exit_zero,
        stats=Stats(min(ctx.size, 256), 0, round(time.perf_counter() - started, 3)),
    )


def audit_training_checkpoint(path: str, options: AuditOptions, started: float) -> Report:
    """Audit a nanoGPT or llama2.c ``ckpt.pt`` (tieaudit.formats.torch_ckpt): the pair its model.py ties."""
    from tieaudit.formats.torch_ckpt import analyse_ckpt  # lazy: imports torch

    ctx = analyse_ckpt(path)
    findings = run_rules(options.rules, ctx)
    p = ctx.project
    name = Path(path).name
    if len(ctx.stored) < 2:
        status = TieStatus.MISSING
    elif ctx.shared or ctx.equal:
        status = TieStatus.TIED
    else:
        status = TieStatus.DIVERGED
    group = TieGroup(
        source=p.embedding,
        targets=(p.head,),
        declared=True,
        governing_flag=f"{p.name} model.py: always tied",
        flag_value=None,
        tied_by_config=True,
        stored={n: (name if n in ctx.stored else None) for n in (p.embedding, p.head)},
        disk_names={},
        status=status,
        observed=(("shared-storage",) if ctx.shared else ()) + (("torch.compile-prefix",) if ctx.compiled else ()),
    )
    comparisons = []
    if ctx.equal is not None:
        comparisons.append(Comparison("on-disk", p.embedding, p.head, None, ctx.max_abs_diff, None))
    return Report(
        tool_version=__version__,
        target=Target(path=path, kind="model", base=None, layout="torch-ckpt", files=(name,), architecture=p.name),
        groups=(group,),
        comparisons=tuple(comparisons),
        findings=tuple(findings),
        skipped=(),
        fail_on=options.fail_on,
        exit_zero=options.exit_zero,
        stats=Stats(0, ctx.tensor_bytes, round(time.perf_counter() - started, 3)),
    )


def audit_gguf(path: str, base: str | None, against: str | None, options: AuditOptions, started: float) -> Report:
    """Audit a GGUF file (tieaudit.formats.gguf): the header, llama.cpp's loader rule, and the source with --against."""
    from tieaudit.formats.gguf import analyse_gguf, gguf_group  # lazy: only for GGUF files

    ctx = analyse_gguf(path, against, base)
    findings = run_rules(options.rules, ctx)
    group = gguf_group(ctx)
    comparisons: list[Comparison] = []
    src = ctx.source
    if src is not None and src.problem is None:
        comparisons.append(
            Comparison(
                "gguf-vs-source", src.embedding, "token_embd.weight", None, None, src.gguf_embedding_vs_embedding
            )
        )
        if src.gguf_head_vs_head is not None:
            used = "output.weight" if ctx.has_head else "token_embd.weight (as the head)"
            comparisons.append(Comparison("gguf-vs-source", src.head, used, None, None, src.gguf_head_vs_head))
    header_bytes = ctx.header.header_bytes + (ctx.base.header_bytes if ctx.base else 0)
    tensor_bytes = src.tensor_bytes if src is not None else 0
    stats = Stats(header_bytes, tensor_bytes, round(time.perf_counter() - started, 3))
    target = Target(
        path=path,
        kind="adapter" if ctx.kind == "adapter" else "model",
        base=base if base is not None else against,
        layout="gguf",
        files=(Path(path).name,),
        architecture=ctx.architecture,
    )
    return Report(
        tool_version=__version__,
        target=target,
        groups=(group,) if group else (),
        comparisons=tuple(comparisons),
        findings=tuple(findings),
        skipped=(),
        fail_on=options.fail_on,
        exit_zero=options.exit_zero,
        stats=stats,
    )


def _arch_name(ckpt: Checkpoint) -> str | None:

    return architecture_of(ckpt.config) if ckpt.config is not None else None


def _analyse(
    ckpt: Checkpoint, path: str, probes: int, progress: Progress | None, skipped: list[Skipped]
) -> tuple[TieGraph, RuleContext]:

    graph, why_not = checkpoint_graph(ckpt, probes, progress)
    skipped.extend(why_not)
    context = RuleContext(
        path=path,
        graph=graph,
        config=ckpt.config,
        index_file=ckpt.index_file,
        index_mismatches=tuple(ckpt.index_mismatches),
        probes=probes,
    )
    return graph, context


def _deep(
    context: AdapterContext,
    analysis: AdapterAnalysis,
    adapter_root: Path,
    skipped: list[Skipped],
    progress: Progress | None,
) -> tuple[AdapterContext, list[Comparison]]:
    """Run the real peft merge -> save -> reload and attach the measurement."""

    from tieaudit.adapter.deep import measure_adapter_merge  # lazy: only for adapters

    if analysis.base_path is None or analysis.architecture is None:
        skipped.append(Skipped("deep", "--deep needs the base and its transformers class"))
        return context, []
    if progress:
        progress("--deep: loading the base and the adapter with transformers and peft", 0, 0)
    measured = measure_adapter_merge(analysis.base_path, adapter_root, analysis.architecture)
    comparison = Comparison(
        stage="measured-merge-reload",
        source="PeftModel (unmerged)",
        target="merge_and_unload -> save_pretrained -> from_pretrained",
        tensor=None,
        max_abs_diff=None,
        rel_diff=None,
        max_abs_logit_diff=measured.max_abs_logit_diff,
        top1_agreement=measured.top1_agreement,
    )
    return replace(context, measured=measured), [comparison]
