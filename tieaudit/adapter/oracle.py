"""peft itself as the judge of an adapter's tied layers.

tieaudit's forecast (`tieaudit.adapter.forecast`) and merge (`tieaudit.repair.merge`) compute what peft does from a
model of peft. This module asks peft instead, at the cost of the tied layers only:

1. the base's model class is built on the meta device from its own config (no memory), and only the modules that
   own the asked parameters (the embedding, the head: the members of the tied groups an adapter touches) are
   materialised on the CPU in float32, with the base's real values, the class's own buffers (e.g. Gemma's embedding
   scale) and the ties transformers made (tied members stay one Parameter);
2. the adapter is applied with `PeftModel.from_pretrained`: peft's own injection, naming rules, modules_to_save,
   trainable tokens, LoRA variants and `ensure_weight_tying` handling. Adapter layers on the other modules stay on
   the meta device and cost nothing;
3. each asked parameter is evaluated through its module's own forward, as the adapted model runs it: its weight's
   rows for probe token ids, and logits ``h @ W.T`` for probe hidden states (streamed over the vocabulary for an
   embedding, so memory stays that of the tied weights);
4. optionally peft's `merge_and_unload` runs on the same modules, the merged tensors go through transformers' own
   `remove_tied_weights_from_state_dict` (what `save_pretrained` keeps) and `tie_weights` of a model rebuilt from the
   merged config with the saved names (what `from_pretrained` ties), and the reloaded parameters are evaluated the
   same way.

Memory is bounded by `MAX_BYTES` (the float32 tied weights and the copies peft makes of them); above it, or when peft
cannot apply the adapter, `OracleUnavailable` says why and the caller must not claim what only the oracle can confirm.
Imports torch, transformers and peft: only called where they are needed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tieaudit.errors import TieauditError
from tieaudit.threads import size_torch
from tieaudit.ties.declared import _reverse_renamer, architecture_of, quiet_libraries

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from tieaudit.checkpoint import Checkpoint

MAX_BYTES = 6 * 2**30  # float32 bytes the oracle may hold: the tied weights, peft's copies of them, the merge
CHUNK_BYTES = 32 * 2**20  # the largest float32 block one evaluation step holds (embedding rows)
ROWS_BY_IDENTITY = 2**22  # a head's probe rows are measured (one identity forward) up to this many weights


class OracleUnavailable(TieauditError):
    """peft could not be asked (too large, the class cannot be built, peft refuses the adapter): why, in one line.
    ``peft_fails``: peft itself fails on this adapter (loading it, or running its tied layers), which a user of the
    adapter meets too; otherwise the check could not be made here (size, the class)."""

    exit_code = 2

    def __init__(self, message: str, *, peft_fails: bool = False) -> None:
        super().__init__(message)
        self.peft_fails = peft_fails


@dataclass(frozen=True)
class MemberProbe:
    """One tied parameter as a model uses it, seen through its module's forward.

    ``rows``: the weight's rows for the probe token ids, float32 ``[n_ids, hidden]`` (an embedding's output divided by
    its scale; a head's rows measured through identity inputs). ``logits``: ``h @ W.T`` for the probe hidden states,
    ``[n_h, vocab]``, without bias; every row of the weight shows in its own column, so the logits see every row.
    ``bias``: the module's bias as it runs (None: no bias). A large head's ``rows`` are empty (see ROWS_BY_IDENTITY).
    """

    name: str
    kind: str  # "embedding" | "linear"
    rows: np.ndarray
    logits: np.ndarray
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class OracleResult:
    """What peft (and transformers, for the reload) really make of the asked parameters."""

    runtime: dict[str, MemberProbe]  # the unmerged PeftModel
    merged: dict[str, MemberProbe | None] | None  # merge_and_unload -> save -> reload (None: dropped, random init)
    merged_config_tied: bool | None  # the governing flag after peft's merge
    peft_version: str
    notes: tuple[str, ...] = ()
    merge_error: str | None = None  # peft's merge_and_unload -> save_pretrained raised this (merged is None then)


def ask_peft(
    base: Checkpoint,
    adapter_dir: str | os.PathLike[str],
    values: Mapping[str, str],
    probe_ids: Sequence[int],
    h: np.ndarray,
    *,
    merge: bool = False,
    max_bytes: int = MAX_BYTES,
) -> OracleResult:
    """Apply the adapter at ``adapter_dir`` to the modules owning ``values``' parameters (in-memory names -> the
    stored base tensor each loads) and evaluate them on ``probe_ids`` and ``h`` (``[n, hidden]``, float32)."""

    with quiet_libraries(), _offline():
        import peft
        import torch

        size_torch(torch)
        model = _meta_model(base)
        members = list(values)
        _check_size(model, members, max_bytes)
        notes = _materialise(model, base, values)
        runtime_model = _apply_adapter(model, Path(adapter_dir))
        ids = torch.tensor(list(probe_ids), dtype=torch.long)
        ht = torch.from_numpy(h).to(torch.float32)
        with torch.no_grad():
            runtime = {}
            for m in members:
                try:
                    runtime[m] = _probe(runtime_model, m, ids, ht)
                except Exception as exc:  # the adapted layer does not run: what the adapted model does too
                    raise OracleUnavailable(
                        f"peft's adapted {m.rpartition('.')[0]} fails to run: {type(exc).__name__}: {_first_line(exc)}",
                        peft_fails=True,
                    ) from exc
            merged: dict[str, MemberProbe | None] | None = None
            flag: bool | None = None
            error: str | None = None
            if merge:
                try:
                    merged, flag = _merge_save_reload(runtime_model, base, members, ids, ht)
                except _PeftMergeFails as exc:
                    error = str(exc)
        return OracleResult(runtime, merged, flag, str(peft.__version__), tuple(notes), error)


class _PeftMergeFails(Exception):
    """peft's merge_and_unload, or the save_pretrained after it, raises: what a user of peft's merge gets."""


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """peft and transformers never reach the Hub from here (everything is local)."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in old})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _meta_model(base: Checkpoint) -> Any:
    """The base's model class, built on the meta device from its config, as `from_pretrained` would build it."""
    import torch
    import transformers

    if base.config is None:
        raise OracleUnavailable("the base has no config.json")
    arch = architecture_of(base.config)
    cls = getattr(transformers, arch, None) if arch else None
    if not isinstance(cls, type):
        raise OracleUnavailable(f"the base's architecture {arch} is not a class of transformers")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(base.root, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = cls(hf_config)
    except Exception as exc:  # transformers raises many types for configs it does not understand
        raise OracleUnavailable(f"cannot build {arch} from the base's config: {type(exc).__name__}: {exc}") from exc
    return model.eval()


def _check_size(model: nn.Module, members: Sequence[str], max_bytes: int) -> None:
    seen: set[int] = set()
    total = 0
    for m in members:
        p = model.get_parameter(m)
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 4
    # peft may copy each (modules_to_save), and a merge holds the merged weights beside the run-time ones
    need = 3 * total
    if need > max_bytes:
        raise OracleUnavailable(
            f"the tied weights need about {need / 2**30:.1f} GiB in float32 to be checked by peft, over the "
            f"bound of {max_bytes / 2**30:.1f} GiB (--peft-max-memory)"
        )


def _tie_classes(model: nn.Module) -> dict[int, list[str]]:
    """Parameter identity -> every name it has (tied parameters are one object with several names)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _materialise(model: Any, base: Checkpoint, values: Mapping[str, str]) -> list[str]:
    """Give the modules owning ``values``' parameters real float32 tensors on the CPU; returns notes."""
    import torch
    from torch import nn

    classes = _tie_classes(model)
    meta_ids = {name: pid for pid, names in classes.items() for name in names}
    owner_names = sorted({m.rpartition(".")[0] for m in values})
    to_disk = _reverse_renamer(model)
    notes: list[str] = []
    real: dict[int, nn.Parameter] = {}  # meta parameter identity -> its real Parameter (shared by tied names)

    def load(name: str) -> torch.Tensor | None:
        disk = values.get(name)
        if disk is None:
            candidate = to_disk(name)
            disk = candidate if candidate in base.tensors else (name if name in base.tensors else None)
        if disk is None:
            return None
        info = base.tensors[disk]
        rows = info.shape[0] if info.shape else 1
        arr = base.read_float32(disk, 0, rows)
        return torch.from_numpy(arr.reshape(tuple(info.shape)))

    for owner in owner_names:
        module = _owner(model, owner)
        _to_cpu_keeping_params_meta(model, module)
        for leaf, _ in list(module.named_parameters(recurse=False)):
            name = f"{owner}.{leaf}" if owner else leaf
            pid = meta_ids[name]
            if pid not in real:
                value = load(name)
                if value is None:
                    value = torch.zeros_like(module.get_parameter(leaf), device="cpu", dtype=torch.float32)
                    notes.append(f"{name} is not stored in the base: zeros in peft's check")
                real[pid] = nn.Parameter(value.to(torch.float32).contiguous(), requires_grad=False)
    # every name of a materialised parameter points at the one real Parameter, as transformers tied them
    for pid, param in real.items():
        for name in classes[pid]:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, param)
    return notes


def _to_cpu_keeping_params_meta(model: Any, module: nn.Module) -> None:
    """Give ``module`` its own buffers on the CPU, initialised by the model class (e.g. Gemma's embedding scale),
    leaving its parameters on the meta device (the caller gives them real values): the class's init then touches no
    weight memory (an embedding's random init alone costs seconds). A buffer the class does not initialise this way
    would hold garbage: the oracle refuses rather than run on it."""
    import torch

    buffers = [name for name, _ in module.named_buffers(recurse=False)]
    for name in buffers:
        b = module.get_buffer(name)
        fill = float("nan") if b.is_floating_point() else 0
        setattr(module, name, torch.full(b.shape, fill, dtype=b.dtype))
    if not buffers:
        return
    try:
        model._init_weights(module)
    except Exception as exc:
        raise OracleUnavailable(f"cannot rebuild the buffers of {type(module).__name__}: {exc}") from exc
    for name in buffers:
        b = module.get_buffer(name)
        if b.is_floating_point():
            if bool(torch.isnan(b).any()):
                raise OracleUnavailable(f"{type(module).__name__}.{name} is not set by the model class's init")
            setattr(module, name, b.to(torch.float32))


def _apply_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    except Exception as exc:  # peft's refusal is the answer
        raise OracleUnavailable(
            f"peft cannot apply the adapter: {type(exc).__name__}: {_first_line(exc)}", peft_fails=True
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _owner(root: Any, owner: str) -> Any:
    return root.get_submodule(owner) if owner else root


def _module(root: Any, param: str) -> Any:
    """The module that owns parameter ``param``."""
    return _owner(root, param.rpartition(".")[0])


def _plain(module: Any) -> Any:
    """The plain transformers layer under peft's wrappers (LoRA layers, modules_to_save, trainable tokens)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(module, "original_module"):
            module = module.original_module
        elif hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
            module = module.get_base_layer()
        else:
            return module
    return module


def _probe(root: Any, param: str, ids: torch.Tensor, h: torch.Tensor) -> MemberProbe:
    """Evaluate the module owning ``param`` (in the PeftModel's inner model, or a plain model) on the probes."""
    import torch
    from torch import nn

    inner = root.get_base_model() if hasattr(root, "get_base_model") else root
    module = _module(inner, param)
    plain = _plain(module)
    weight = plain.weight
    vocab, hidden = int(weight.shape[0]), int(weight.shape[1])
    if isinstance(plain, nn.Embedding):
        scale = _embedding_scale(plain, vocab)
        rows = (module(ids[None])[0] / scale).float()
        step = max(1, CHUNK_BYTES // (4 * hidden))
        logits = torch.empty(h.shape[0], vocab, dtype=torch.float32)
        for a in range(0, vocab, step):
            b = min(vocab, a + step)
            block = module(torch.arange(a, b)[None])[0].float() / scale
            logits[:, a:b] = h @ block.T
        return MemberProbe(param, "embedding", rows.numpy(), logits.numpy())
    # a head (Linear, Conv1D): the logits directly, every row of the weight in its own column. Its rows for the
    # probe ids would take one forward per hidden unit (a full matrix product): measured only for small heads
    bias_rt = module(torch.zeros(1, hidden))[0].float()
    logits = module(h).float() - bias_rt
    rows = torch.empty(0, hidden, dtype=torch.float32)
    if vocab * hidden <= ROWS_BY_IDENTITY:
        cols = module(torch.eye(hidden)).float() - bias_rt  # [hidden, vocab] = W.T
        rows = cols[:, ids].T.contiguous()
    has_bias = getattr(plain, "bias", None) is not None
    return MemberProbe(param, "linear", rows.numpy(), logits.numpy(), bias_rt.numpy() if has_bias else None)


def _embedding_scale(plain: nn.Embedding, vocab: int) -> float:
    """The factor the embedding class multiplies its rows by (Gemma: sqrt(hidden)), measured on its own forward at
    the largest entry of the first row that has a non-zero one."""
    import torch

    w = plain.weight
    for row in range(min(vocab, 64)):
        col = int(torch.argmax(w[row].abs()))
        if float(w[row, col]) != 0.0:
            out = plain(torch.tensor([[row]]))[0, 0, col]
            return float(out / w[row, col])
    return 1.0


def _merge_save_reload(
    runtime_model: Any, base: Checkpoint, members: Sequence[str], ids: torch.Tensor, h: torch.Tensor
) -> tuple[dict[str, MemberProbe | None], bool | None]:
    """peft's merge_and_unload, then what save_pretrained keeps and from_pretrained ties (transformers' own code)."""
    import torch
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    try:
        merged = runtime_model.merge_and_unload()
    except Exception as exc:
        raise _PeftMergeFails(f"merge_and_unload raises {type(exc).__name__}: {_first_line(exc)}") from exc
    state = {}
    for owner in sorted({m.rpartition(".")[0] for m in members}):
        # every parameter under the owner: a wrapper peft leaves behind shows up as the names save_pretrained sees
        for leaf, p in _owner(merged, owner).named_parameters():
            state[f"{owner}.{leaf}" if owner else leaf] = p.detach()
    try:
        saved = remove_tied_weights_from_state_dict(dict(state), merged)
    except Exception as exc:
        raise _PeftMergeFails(
            f"save_pretrained after merge_and_unload raises {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    flag = getattr(merged.config, "tie_word_embeddings", None)
    with torch.device("meta"):
        reloaded = type(merged)(merged.config)
    return _load_and_probe(reloaded.eval(), saved, members, ids, h), (bool(flag) if flag is not None else None)


def _load_and_probe(
    model: Any, saved: Mapping[str, torch.Tensor], members: Sequence[str], ids: torch.Tensor, h: torch.Tensor
) -> dict[str, MemberProbe | None]:
    """`from_pretrained` for the modules owning ``members``: the saved tensors loaded by name, transformers'
    symmetric `tie_weights` for the names not saved, then each member probed (None: still missing after tying,
    which transformers initialises randomly)."""
    import torch
    from torch import nn

    owners = sorted({m.rpartition(".")[0] for m in members})
    names: list[str] = []
    for owner in owners:
        module = _owner(model, owner)
        _to_cpu_keeping_params_meta(model, module)
        for leaf, p in list(module.named_parameters(recurse=False)):
            name = f"{owner}.{leaf}" if owner else leaf
            names.append(name)
            # never written to: the saved tensor itself, no copy
            value = saved[name].to(torch.float32) if name in saved else torch.full(p.shape, float("nan"))
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    # parameters left on the meta device (modules outside the members') count as missing, as on a load that lacks
    # them: tie_weights then ties them to what is loaded instead of comparing a real tensor with a meta one
    on_meta = {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"}
    model.tie_weights(missing_keys={n for n in names if n not in saved} | on_meta, recompute_mapping=False)
    out: dict[str, MemberProbe | None] = {}
    for m in members:
        p = model.get_parameter(m)
        out[m] = None if bool(torch.isnan(p).all()) else _probe(model, m, ids, h)
    return out


def probe_checkpoint(
    ckpt: Checkpoint, members: Sequence[str], probe_ids: Sequence[int], h: np.ndarray
) -> dict[str, MemberProbe | None]:
    """The ``members`` of a written model (e.g. a merge's staging directory) as transformers loads them: the stored
    tensors of their modules by their on-disk names, tied by the written config, evaluated like `ask_peft`."""
    import torch

    with quiet_libraries(), _offline():
        model = _meta_model(ckpt)
        to_disk = _reverse_renamer(model)
        saved: dict[str, torch.Tensor] = {}
        for owner in sorted({m.rpartition(".")[0] for m in members}):
            for leaf, _ in _owner(model, owner).named_parameters(recurse=False):
                name = f"{owner}.{leaf}" if owner else leaf
                disk = next((d for d in (to_disk(name), name) if d in ckpt.tensors), None)
                if disk is not None:
                    info = ckpt.tensors[disk]
                    arr = ckpt.read_float32(disk, 0, info.shape[0] if info.shape else 1)
                    saved[name] = torch.from_numpy(arr.reshape(tuple(info.shape)))
        ids = torch.tensor(list(probe_ids), dtype=torch.long)
        with torch.no_grad():
            return _load_and_probe(model, saved, members, ids, torch.from_numpy(h).to(torch.float32))
