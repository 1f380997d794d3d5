"""TIE2xx: GGUF files (llama.cpp), from the header and llama.cpp's loader rule for the architecture
(`tieaudit.formats.llamacpp`); with ``--against HF_DIR``, against the checkpoint the file was converted from."""

from __future__ import annotations

from collections.abc import Iterator

from tieaudit.formats.gguf import EMBEDDING, HEAD, GgufContext
from tieaudit.formats.llamacpp import commit
from tieaudit.model import Applicability, FixHint, Location, Severity
from tieaudit.rules.registry import Violation, rule, violation
from tieaudit.rules.wording import num as _num

CONVERT = "python convert_hf_to_gguf.py {src} --outfile OUT.gguf"


def _where(ctx: GgufContext, tensor: str | None = None) -> Location:
    return Location(file=ctx.path.rsplit("/", 1)[-1], tensor=tensor, config_key="/general.architecture")


def _loader(ctx: GgufContext) -> str:
    r = ctx.rule
    assert r is not None
    return f"llama.cpp's {r.architecture} loader ({r.source} at {r.commit[:10]})"


@rule(
    code="TIE201",
    name="gguf-head-required-missing",
    severity=Severity.ERROR,
    family="gguf",
    summary="a GGUF model lacks output.weight, and its architecture's llama.cpp loader requires it",
    explain="""
A GGUF file records no tie: a tied model is one without `output.weight`. Most llama.cpp loaders
(llama, qwen2/3, gemma3, phi3, gpt2, t5, ...) then use `token_embd.weight` as the head. Others create
`output.weight` as a required tensor (phi2, gptneox, stablelm, qwen, qwen2moe, olmo2, internlm2,
rwkv6/7, ...): a file without it does not load ("tensor 'output.weight' not found"). Such a file
comes from a tied checkpoint (no `lm_head.weight` stored), converted for an architecture that never
ties.

Which rule applies is read from llama.cpp's own sources for every architecture
(`tools/llamacpp_table.py`; `docs/formats.md` lists them).

Fix: convert a checkpoint that stores the head: `tieaudit fix HF_DIR --untie --output-dir UNTIED`
(stores `lm_head.weight` as a copy of the embedding), then `python convert_hf_to_gguf.py UNTIED`.
""",
)
def gguf_head_required_missing(ctx: GgufContext) -> Iterator[Violation]:
    if ctx.kind != "model" or ctx.rule is None or ctx.rule.rule != "required" or ctx.has_head:
        return
    src = ctx.source.path if ctx.source else "HF_DIR"
    yield violation(
        f"{HEAD} is absent, and {_loader(ctx)} requires it: llama.cpp refuses to load this file "
        f"(tensor '{HEAD}' not found); it cannot fall back to {EMBEDDING} for this architecture",
        _where(ctx, HEAD),
        evidence={"architecture": ctx.architecture, "rule": ctx.rule.rule, "statement": ctx.rule.statement},
        fix=FixHint(
            Applicability.MANUAL,
            f"tieaudit fix {src} --untie --output-dir UNTIED && " + CONVERT.format(src="UNTIED"),
            "convert a checkpoint that stores the head (lm_head.weight)",
        ),
    )


@rule(
    code="TIE202",
    name="gguf-head-not-loaded",
    severity=Severity.ERROR,
    family="gguf",
    summary="a GGUF model holds output.weight, but its architecture's llama.cpp loader never loads one",
    explain="""
For some architectures llama.cpp always uses `token_embd.weight` as the head (gemma, gemma2,
command-r, cohere2, openelm, plm, ...) or loads no head at all (bert and other encoders). The loader
counts every tensor of the file it did not create, so a file that holds `output.weight` for them
does not load ("done_getting_tensors: wrong number of tensors"). llama.cpp's converter drops the head
of Gemma and Gemma 2 for this reason; a file written by another tool, or a head added afterwards,
breaks. If that head was trained apart from the embedding, this architecture cannot carry it.

Fix: write the file without `output.weight` (convert again with llama.cpp's converter); a separately
trained head is lost either way: keep the Hugging Face checkpoint for it.
""",
)
def gguf_head_not_loaded(ctx: GgufContext) -> Iterator[Violation]:
    if ctx.kind != "model" or ctx.rule is None or not ctx.rule.refuses_output or not ctx.has_head:
        return
    what = "always uses token_embd.weight as the head" if ctx.rule.rule == "embedding" else "loads no head"
    yield violation(
        f"{HEAD} is stored, but {_loader(ctx)} {what} and never creates {HEAD}: llama.cpp refuses to load this "
        "file (wrong number of tensors)",
        _where(ctx, HEAD),
        evidence={"architecture": ctx.architecture, "rule": ctx.rule.rule, "statement": ctx.rule.statement},
        fix=FixHint(Applicability.MANUAL, None, f"convert again without {HEAD} (llama.cpp's converter drops it)"),
    )


@rule(
    code="TIE203",
    name="gguf-architecture-unknown",
    severity=Severity.WARNING,
    family="gguf",
    summary="a GGUF model's architecture is not one llama.cpp loads, so its head could not be checked",
    explain="""
Whether a GGUF file without `output.weight` runs tied, fails to load, or runs without a head depends
on its architecture's llama.cpp loader. `general.architecture` is missing, or names an architecture
that llama.cpp (at the commit tieaudit's table was read from) does not load, so that could not be
checked. A check that could not run is not a pass.

Fix: check the file with the llama.cpp you run it with; `python tools/llamacpp_table.py LLAMA_CPP`
regenerates tieaudit's table from a newer llama.cpp.
""",
)
def gguf_architecture_unknown(ctx: GgufContext) -> Iterator[Violation]:
    if ctx.kind != "model" or ctx.rule is not None:
        return
    arch = repr(ctx.architecture) if ctx.architecture else "not recorded (no general.architecture)"
    yield violation(
        f"architecture {arch}: llama.cpp's loaders (commit {_commit()}) have no such architecture, so whether "
        f"this file {'with' if ctx.has_head else 'without'} {HEAD} loads, and with which head, could not be "
        "checked",
        _where(ctx),
        evidence={"architecture": ctx.architecture, "has_output": ctx.has_head},
        fix=FixHint(Applicability.MANUAL, None, "check the file with the llama.cpp that runs it"),
    )


def _commit() -> str:
    return commit()[:10]


@rule(
    code="TIE204",
    name="gguf-trained-head-dropped",
    severity=Severity.ERROR,
    family="gguf",
    summary="the source checkpoint has a head trained apart from its embedding, and the GGUF file has none",
    explain="""
With `--against HF_DIR`: the checkpoint the file was converted from loads (in transformers) a head
that differs from its input embedding (untied, `lm_head.weight` stored), but the GGUF file has no
`output.weight`, so llama.cpp runs it with `token_embd.weight` as the head: every logit differs from
the source model's. llama.cpp's converter writes `output.weight` only when the checkpoint it reads
stores the head; Gemma and Gemma 2 always drop it (their loaders cannot use one); users report
trained heads lost this way (llama.cpp issues 9065, 11345, 11554, 12567; unsloth 1971).

The finding gives the distance of the source head from the source embedding on sampled rows
(relative, scale-free): what dropping the head changes.

Fix: convert again from a checkpoint that stores the trained head: `python convert_hf_to_gguf.py
HF_DIR --outfile OUT.gguf`. For an architecture whose llama.cpp loader always ties, the head cannot
be carried: keep the Hugging Face checkpoint, or retrain tied.
""",
)
def gguf_trained_head_dropped(ctx: GgufContext) -> Iterator[Violation]:
    src = ctx.source
    if ctx.kind != "model" or src is None or src.problem or not src.distinct or ctx.has_head:
        return
    carried = ctx.rule is None or not ctx.rule.refuses_output
    how = (
        f"llama.cpp runs it with {EMBEDDING} as the head"
        if ctx.rule is not None and ctx.rule.ties_when_absent
        else "llama.cpp cannot run it with that head"
    )
    yield violation(
        f"the source {src.path} loads {src.head} trained apart from {src.embedding} (relative distance "
        f"{_num(src.head_vs_embedding)} on {src.rows} sampled rows), but this file has no {HEAD}: {how}, and the "
        "trained head is lost",
        _where(ctx, HEAD),
        evidence={
            "source": src.path,
            "source_status": str(src.status),
            "head_vs_embedding": src.head_vs_embedding,
            "gguf_embedding_vs_embedding": src.gguf_embedding_vs_embedding,
            "rows": src.rows,
            "rule": None if ctx.rule is None else ctx.rule.rule,
        },
        fix=FixHint(
            Applicability.MANUAL,
            CONVERT.format(src=src.path) if carried else None,
            "convert again from the checkpoint that stores the trained head"
            if carried
            else f"the {ctx.architecture} loader always ties: keep the Hugging Face checkpoint for this head",
        ),
    )


def _carries_embedding(ctx: GgufContext) -> bool:
    """The file's head is the source's embedding: closer to it than to the source head, and as close to it as
    quantisation explains (where that is measured; else at most half as far as from the head)."""
    src = ctx.source
    if src is None or src.gguf_head_vs_head is None or src.gguf_head_vs_embedding is None:
        return False
    to_head, to_emb = src.gguf_head_vs_head, src.gguf_head_vs_embedding
    if to_emb >= to_head:
        return False
    return to_emb <= 2 * src.head_floor + 1e-3 if src.head_floor is not None else to_emb < 0.5 * to_head


@rule(
    code="TIE205",
    name="gguf-head-is-embedding",
    severity=Severity.ERROR,
    family="gguf",
    summary="the GGUF file's head matches the source's embedding, not the head the source model loads",
    explain="""
With `--against HF_DIR`: the source checkpoint loads a head trained apart from its embedding, but the
head llama.cpp loads from the GGUF file (`output.weight`) is the source's embedding: closer to it than
to that head, and as close to it as the file's quantisation explains (TIE208 says how that is
measured), on sampled rows dequantised with the `gguf` package's own code. The file was converted
from a checkpoint whose head had been overwritten by the embedding (re-tied by `tie_weights()`, a
merge, or a save under a tied config), not from the model that was trained.

Distances are relative and scale-free (`min_s ||g - s x|| / ||g||`), so converters that rescale the
head or the embedding (Falcon-H1, Jais) do not trip it.

Fix: convert again from the checkpoint that holds the trained head: `python convert_hf_to_gguf.py
HF_DIR --outfile OUT.gguf`.
""",
)
def gguf_head_is_embedding(ctx: GgufContext) -> Iterator[Violation]:
    src = ctx.source
    if ctx.kind != "model" or src is None or src.problem or not src.distinct or not ctx.has_head:
        return
    if not _carries_embedding(ctx):
        return
    to_head, to_emb = src.gguf_head_vs_head, src.gguf_head_vs_embedding
    yield violation(
        f"{HEAD} is closer to the source's {src.embedding} (relative distance {_num(to_emb)}) than to the "
        f"{src.head} the source model loads ({_num(to_head)}), on {src.rows} sampled rows: this file carries the "
        "embedding as its head, not the trained head",
        _where(ctx, HEAD),
        evidence={
            "source": src.path,
            "gguf_head_vs_head": to_head,
            "gguf_head_vs_embedding": to_emb,
            "head_vs_embedding": src.head_vs_embedding,
            "rows": src.rows,
        },
        fix=FixHint(Applicability.MANUAL, CONVERT.format(src=src.path), "convert again from the trained checkpoint"),
    )


@rule(
    code="TIE206",
    name="gguf-lora-head-on-tied-base",
    severity=Severity.ERROR,
    family="gguf",
    summary="a GGUF LoRA adapter changes output.weight, which its (tied) base does not have",
    explain="""
A GGUF LoRA adapter (`general.type` = adapter) names the base tensors it changes
(`output.weight.lora_a` / `.lora_b`). llama.cpp looks each up in the base model; a tied base has no
`output.weight` (its head is `token_embd.weight`), so the adapter does not load: "LoRA tensor
'output.weight' does not exist in base model". llama.cpp's LoRA converter refuses such adapters for
bases whose converter drops the head ("lm_head is present in adapter, but is ignored in base
model"), and drops them silently for Gemma and Gemma 2.

With `--base BASE.gguf` the base is read; without it, the finding is an error where the
architecture's loader never has `output.weight`, and a warning otherwise (it loads only on a base
that stores the head).

Fix: merge the adapter into an untied base (`tieaudit merge`) and convert the merged model; or
retrain without a LoRA on `lm_head`.
""",
)
def gguf_lora_head_on_tied_base(ctx: GgufContext) -> Iterator[Violation]:
    if ctx.kind != "adapter" or HEAD not in ctx.lora_targets():
        return
    if ctx.base is not None:
        if HEAD in ctx.base.tensors:
            return
        why = f"the base {ctx.base_path} has no {HEAD} (it is tied)"
        severity = Severity.ERROR
    elif ctx.rule is not None and ctx.rule.refuses_output:
        why = f"no {ctx.architecture} base has one ({_loader(ctx)} never loads {HEAD})"
        severity = Severity.ERROR
    else:
        why = f"it loads only on a base that stores {HEAD}, and a tied base does not (pass --base BASE.gguf to check)"
        severity = Severity.WARNING
    yield violation(
        f"the adapter changes {HEAD}, but {why}: llama.cpp refuses to load it (LoRA tensor '{HEAD}' does not "
        "exist in base model)",
        _where(ctx, f"{HEAD}.lora_a"),
        severity=severity,
        evidence={"targets": ctx.lora_targets(), "base": ctx.base_path},
        fix=FixHint(
            Applicability.MANUAL, None, "merge into an untied base (tieaudit merge) and convert the merged model"
        ),
    )


@rule(
    code="TIE207",
    name="gguf-source-mismatch",
    severity=Severity.WARNING,
    family="gguf",
    summary="the checkpoint given with --against cannot be compared with the GGUF file",
    explain="""
With `--against HF_DIR`, the GGUF file's embedding and head are compared with the checkpoint's on
sampled rows. Their shapes do not fit (another model, another vocabulary), so the comparison could not
run, and a comparison that could not run is not a pass.

Fix: give the checkpoint the file was converted from.
""",
)
def gguf_source_mismatch(ctx: GgufContext) -> Iterator[Violation]:
    src = ctx.source
    if src is None or src.problem is None:
        return
    yield violation(
        f"--against {src.path} cannot be compared with this file: {src.problem}",
        _where(ctx, EMBEDDING),
        evidence={"source": src.path, "problem": src.problem},
        fix=FixHint(Applicability.MANUAL, None, "give the checkpoint the file was converted from"),
    )


@rule(
    code="TIE208",
    name="gguf-head-differs",
    severity=Severity.ERROR,
    family="gguf",
    summary="the GGUF file's head differs from the source's head beyond what its quantisation explains",
    explain="""
With `--against HF_DIR`: the head llama.cpp loads from the file (`output.weight`, or
`token_embd.weight` where the loader falls back to it) is compared with the head transformers loads
from the source, on sampled rows. Quantisation moves the values; how far is measured, not assumed:
the source rows are stored in the file's type by the `gguf` package's own quantiser (F32, F16 and
BF16 by rounding), and where the package has no quantiser for the type (K-quants, i-quants), the
file's own embedding, stored in the same type, calibrates it. The file's head is more than twice
that far from the source head: it is another head (another fine-tune, a merge that changed it, a
conversion from the wrong checkpoint). Without a measurable floor, nothing is claimed (the evidence
says so).

Fix: convert again from the checkpoint the file should hold: `python convert_hf_to_gguf.py HF_DIR
--outfile OUT.gguf`.
""",
)
def gguf_head_differs(ctx: GgufContext) -> Iterator[Violation]:
    src = ctx.source
    if ctx.kind != "model" or src is None or src.problem or src.gguf_head_vs_head is None or src.head_floor is None:
        return
    if src.distinct and not ctx.has_head:
        return  # TIE204: the trained head is not in the file at all
    if src.distinct and ctx.has_head and _carries_embedding(ctx):
        return  # TIE205: the file's head is the source's embedding
    if src.gguf_head_vs_head <= 2 * src.head_floor + 1e-3:
        return
    used = HEAD if ctx.has_head else f"{EMBEDDING} (the head llama.cpp uses)"
    yield violation(
        f"{used} is {_num(src.gguf_head_vs_head)} (relative) from the source's {src.head} on {src.rows} sampled rows, "
        f"while storing that head as {src.head_type} moves it {_num(src.head_floor)}: this file carries another head",
        _where(ctx, HEAD if ctx.has_head else EMBEDDING),
        evidence={
            "source": src.path,
            "gguf_head_vs_head": src.gguf_head_vs_head,
            "quantisation_floor": src.head_floor,
            "type": src.head_type,
            "rows": src.rows,
        },
        fix=FixHint(Applicability.MANUAL, CONVERT.format(src=src.path), "convert again from the source checkpoint"),
    )
