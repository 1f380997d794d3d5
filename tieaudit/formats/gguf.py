"""A GGUF file's head, as llama.cpp loads it: from the header alone, and with ``--against`` the Hugging Face checkpoint
it was converted from, compared on a sample of rows. Returns data for the rules in `tieaudit/rules/gguf.py`.

A GGUF file records no tie: a tied model simply has no ``output.weight``, and what llama.cpp does then depends on the
architecture's loader (`tieaudit.formats.llamacpp`). llama.cpp's converter writes ``output.weight`` exactly when the
source checkpoint stores a head tensor (Gemma and Gemma 2 never; some classes not when the config ties), so a head
trained apart from the embedding is lost whenever the checkpoint converted did not store it, or stored the embedding
in its place.

The comparison with the source reads ``SAMPLE_ROWS`` seeded rows of the source's embedding and head and of the GGUF's
head (``output.weight``, or ``token_embd.weight`` where the loader falls back to it), dequantised with the `gguf`
package's own code. Distances are relative and scale-free (``min_s ||g - s x|| / ||g||``), since some converters
rescale the head or the embedding (Falcon-H1's multipliers).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tieaudit.checkpoint.safetensors_header import read_into
from tieaudit.errors import InputError
from tieaudit.formats.gguf_header import GgufHeader, GgufTensor, read_gguf_header
from tieaudit.formats.llamacpp import HeadRule, head_rule
from tieaudit.model import TieGroup, TieStatus
from tieaudit.ties.compare import PROBE_SEED

if TYPE_CHECKING:
    import numpy as np

EMBEDDING = "token_embd.weight"
HEAD = "output.weight"
LORA_SUFFIXES = (".lora_a", ".lora_b")
SAMPLE_ROWS = 64
RULE_WORDS = {
    "fallback": "optional, else token_embd.weight",
    "required": "required",
    "embedding": "never loaded, token_embd.weight is the head",
    "absent": "never loaded, no head",
    "optional": "optional, no fallback",
}
DISTINCT = 1e-5  # a source head this far from its embedding (relative) is its own (as `forecast.REL_TOL`)


@dataclass(frozen=True)
class SourceHead:
    """The Hugging Face checkpoint given with ``--against``, as transformers loads its head, against the GGUF's."""

    path: str
    status: TieStatus  # the source pair's load verdict (tieaudit's own, from the checkpoint)
    embedding: str  # in-memory names
    head: str
    distinct: bool  # the head transformers loads is not the embedding (untied, stored, different values)
    head_vs_embedding: float | None  # scale-free distance of the source head from the source embedding (sampled rows)
    gguf_head_vs_head: float | None  # the GGUF's head against the source head
    gguf_head_vs_embedding: float | None  # the GGUF's head against the source embedding
    gguf_embedding_vs_embedding: float | None  # token_embd.weight against the source embedding
    rows: int  # rows compared
    problem: str | None = None  # why the files could not be compared (shapes differ, ...)
    tensor_bytes: int = 0  # tensor bytes read, from both files
    # the distance from the source head that storing it in the GGUF head's type alone gives (None: not known here)
    head_floor: float | None = None
    head_type: str | None = None


@dataclass(frozen=True)
class GgufContext:
    """What the GGUF rules see."""

    family: ClassVar[str] = "gguf"
    path: str
    header: GgufHeader
    kind: str  # "model" | "adapter" (general.type)
    architecture: str | None
    rule: HeadRule | None  # None: an architecture llama.cpp does not load (at the recorded commit)
    source: SourceHead | None = None  # --against
    base: GgufHeader | None = None  # --base for a GGUF adapter
    base_path: str | None = None

    @property
    def has_head(self) -> bool:
        return HEAD in self.header.tensors

    def lora_targets(self) -> list[str]:
        """Base tensors a GGUF LoRA adapter changes (``<name>.lora_a`` / ``.lora_b``)."""
        return sorted({n[: -len(s)] for n in self.header.tensors for s in LORA_SUFFIXES if n.endswith(s)})


def analyse_gguf(path: str, against: str | None, base: str | None) -> GgufContext:
    header = read_gguf_header(path)
    kind = "adapter" if header.string("general.type") == "adapter" else "model"
    arch = header.string("general.architecture")
    rule = head_rule(arch)
    base_header = None
    if base is not None:
        if kind != "adapter":
            raise InputError("--base is for adapters; this GGUF file is a model")
        base_header = read_gguf_header(base)
        if base_header.string("general.type") == "adapter":
            raise InputError(f"--base {base}: a GGUF adapter, not a model")
    source = None
    if against is not None:
        if kind == "adapter":
            raise InputError("--against compares a GGUF model with its source; this GGUF file is an adapter")
        source = compare_with_source(path, header, rule, against)
    return GgufContext(path, header, kind, arch, rule, source, base_header, base)


def gguf_group(ctx: GgufContext) -> TieGroup | None:
    """The head's tie as a tie group: token_embd.weight is the source, output.weight the target."""
    if ctx.kind != "model" or EMBEDDING not in ctx.header.tensors:
        return None
    name = Path(ctx.path).name
    rule = ctx.rule
    stored = {EMBEDDING: name, HEAD: name if ctx.has_head else None}
    if rule is None:
        status = TieStatus.UNTIED if ctx.has_head else TieStatus.TIED
    elif ctx.has_head:
        status = TieStatus.DIVERGED if rule.refuses_output else TieStatus.UNTIED
    else:
        status = TieStatus.TIED if rule.ties_when_absent else TieStatus.MISSING
    governing = f"llama.cpp's {ctx.architecture} loader: output.weight {RULE_WORDS[rule.rule]}" if rule else None
    return TieGroup(
        source=EMBEDDING,
        targets=(HEAD,),
        declared=rule is not None,
        governing_flag=governing,
        flag_value=None,
        tied_by_config=bool(rule and rule.ties_when_absent and not ctx.has_head),
        stored=stored,
        disk_names={},
        status=status,
        observed=("gguf-output-absent",) if not ctx.has_head else (),
    )


def compare_with_source(path: str, header: GgufHeader, rule: HeadRule | None, against: str) -> SourceHead:
    """The source's head as transformers loads it, against the GGUF's head as llama.cpp loads it (sampled rows)."""
    from tieaudit.checkpoint import open_checkpoint  # lazy: only with --against
    from tieaudit.ties.graph import checkpoint_graph  # lazy: only with --against

    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(against))
        if ckpt.kind != "model":
            raise InputError(f"--against {against}: an adapter; give the model it was merged into")
        graph, _ = checkpoint_graph(ckpt)
        declared = graph.declared
        head = declared.head if declared else None
        group = next((g for g in graph.groups if head is not None and head in g.members), None)
        if group is None or head is None:
            raise InputError(f"--against {against}: tieaudit finds no tied input embedding and head in it")
        embedding = group.source if group.source != head else group.targets[0]
        disk = graph.disk_names
        emb_disk = disk.get(embedding, embedding)
        head_disk = disk.get(head) if group.stored.get(head) is not None else None
        loads_head = group.status is TieStatus.UNTIED and head_disk is not None
        emb_info = ckpt.tensors[emb_disk]
        vocab, hidden = (int(d) for d in emb_info.shape)
        g_emb = header.tensors.get(EMBEDDING)
        g_head = header.tensors.get(HEAD)
        if g_head is None and rule is not None and rule.ties_when_absent:
            g_head = g_emb
        problem = None
        if g_emb is None:
            problem = f"the GGUF file has no {EMBEDDING}"
        for t in (g_emb, g_head):
            if problem is None and t is not None and (len(t.shape) != 2 or t.shape[1] != hidden or t.shape[0] < vocab):
                problem = f"{t.name} is {list(t.shape)}, the source's {emb_disk} [{vocab}, {hidden}]"
        if problem is not None:
            return SourceHead(against, group.status, embedding, head, loads_head, None, None, None, None, 0, problem)
        rows = _sample(vocab)
        e = _source_rows(ckpt, emb_disk, rows)
        h = _source_rows(ckpt, head_disk, rows) if loads_head and head_disk else e
        assert g_emb is not None
        fd = os.open(path, os.O_RDONLY)
        try:
            ge = _gguf_rows(fd, g_emb, rows, path)
            gh = _gguf_rows(fd, g_head, rows, path) if g_head is not None else None
        finally:
            os.close(fd)
        read = ckpt.stats.tensor_bytes + sum(t.nbytes // t.rows * len(rows) for t in (g_emb, g_head) if t)
        head_vs_emb = _distance(h, e)
        distinct = loads_head and head_vs_emb > DISTINCT
        floor = None
        if g_head is not None:
            floor = quantisation_floor(h, g_head)
            if floor is None and g_head is not g_emb and g_head.type_id == g_emb.type_id:
                floor = _distance(ge, e)  # the file's embedding, stored in the same type, calibrates it
        return SourceHead(
            path=against,
            status=group.status,
            embedding=embedding,
            head=head,
            distinct=distinct,
            head_vs_embedding=head_vs_emb,
            gguf_head_vs_head=None if gh is None else _distance(gh, h),
            gguf_head_vs_embedding=None if gh is None else _distance(gh, e),
            gguf_embedding_vs_embedding=_distance(ge, e),
            rows=len(rows),
            tensor_bytes=read,
            head_floor=floor,
            head_type=None if g_head is None else g_head.type_name,
        )


def _sample(vocab: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(PROBE_SEED)
    return sorted({int(i) for i in rng.integers(0, vocab, size=min(SAMPLE_ROWS, vocab))})


def _source_rows(ckpt: Any, name: str, rows: list[int]) -> np.ndarray:
    import numpy as np

    return np.stack([ckpt.read_float32(name, r, r + 1)[0] for r in rows]).astype(np.float64)


def _gguf_rows(fd: int, t: GgufTensor, rows: list[int], label: str) -> np.ndarray:
    """Rows ``rows`` of a GGUF tensor, dequantised to float64 (only those rows' bytes are read)."""
    import numpy as np

    row_bytes = t.nbytes // max(t.rows, 1)
    out = []
    for r in rows:
        raw = np.empty(row_bytes, np.uint8)
        read_into(fd, t.offset + r * row_bytes, raw, label)
        out.append(dequantize_row(raw, t))
    return np.stack(out).astype(np.float64)


def dequantize_row(raw: np.ndarray, t: GgufTensor) -> np.ndarray:
    """One row's bytes as float32, by the `gguf` package's own dequantisation (F32/F16/BF16 directly)."""
    import numpy as np

    if t.type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if t.type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if t.type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    try:
        from gguf import GGMLQuantizationType  # lazy: gguf imports numpy and yaml; only quantised rows need it
        from gguf.quants import dequantize  # lazy: as above
    except ImportError:
        raise InputError(f"dequantising {t.type_name} needs the gguf package (pip install gguf)") from None
    try:
        values: np.ndarray = dequantize(raw.reshape(1, -1), GGMLQuantizationType(t.type_id))
    except (NotImplementedError, ValueError) as exc:
        raise InputError(f"{t.name}: the gguf package cannot dequantise {t.type_name}: {exc}") from None
    return values.reshape(-1).astype(np.float32)


def quantisation_floor(rows: np.ndarray, t: GgufTensor) -> float | None:
    """How far storing ``rows`` in ``t``'s type moves them (the same scale-free distance): F32, F16 and BF16 by
    rounding, other types by the `gguf` package's own quantiser where it has one (None: it has none)."""
    import numpy as np

    x = np.ascontiguousarray(rows, dtype=np.float32)
    if t.type_name == "F32":
        return _distance(x.astype(np.float64), rows)
    if t.type_name == "F16":
        return _distance(x.astype(np.float16).astype(np.float64), rows)
    if t.type_name == "BF16":
        return _distance((x.view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float64), rows)
    try:
        from gguf import GGMLQuantizationType  # lazy: gguf imports numpy and yaml; only quantised rows need it
        from gguf.quants import dequantize, quantize  # lazy: as above

        q = GGMLQuantizationType(t.type_id)
        back = dequantize(quantize(x, q), q)
    except Exception:  # the package cannot quantise this type (K-quants, i-quants): no floor from it
        return None
    return _distance(np.asarray(back, dtype=np.float64).reshape(rows.shape), rows)


def _distance(g: np.ndarray, x: np.ndarray) -> float:
    """``min_s ||g - s x|| / ||g||``: how far ``g`` is from any multiple of ``x`` (0: equal up to scale)."""
    import numpy as np

    gg = float(np.sum(g * g))
    xx = float(np.sum(x * x))
    if gg == 0.0:
        return 0.0 if xx == 0.0 else 1.0
    if xx == 0.0:
        return 1.0
    s = float(np.sum(g * x)) / xx
    return float(np.sqrt(max(float(np.sum((g - s * x) ** 2)), 0.0) / gg))
