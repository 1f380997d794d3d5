"""Auditing a live `nn.Module`: does tying hold now, and what would save_pretrained -> from_pretrained do?

Tensors are grouped by storage, not by Parameter identity, so views that share memory (a transposed
factor, a slice) count as tied. The save is simulated the way transformers does it: of the names
that share one storage, only one is written; the rules then judge the "saved" checkpoint.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tieaudit._version import __version__
from tieaudit.auditing import severity
from tieaudit.checkpoint.pickled import dtype_code
from tieaudit.checkpoint.types import ConfigFile, TensorInfo
from tieaudit.model import Report, Severity, Skipped, Stats, Target
from tieaudit.rules import RuleContext, run, selected
from tieaudit.ties.declared import DeclaredTies, ties_of_model
from tieaudit.ties.graph import build_graph
from tieaudit.ties.readers import TIE_FLAG

if TYPE_CHECKING:
    import torch

MEMORY = "<memory>"
_PEFT_MARKERS = (".base_layer.",)


class LiveTensors:
    """A `TensorSource` over a module's state dict, as save_pretrained would write it."""

    def __init__(self, state: dict[str, torch.Tensor], keep: set[str], storage: dict[str, tuple[str, str]]) -> None:
        self._state = state
        self.metadata: dict[str, dict[str, str]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name in keep:
            t = state[name]
            self.tensors[name] = TensorInfo(
                name=name,
                file=MEMORY,
                dtype=_dtype_code(t),
                shape=tuple(t.shape),
                nbytes=t.numel() * t.element_size(),
                storage_id=storage[name],
            )
        self.tensor_bytes = 0

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._state[name].detach()
        rows = t.reshape(1, -1) if t.dim() == 0 else t
        out = rows[start:stop].to("cpu")
        self.tensor_bytes += out.numel() * out.element_size()
        return out


def _dtype_code(t: torch.Tensor) -> str:

    return dtype_code(t.dtype) or str(t.dtype)


def _storage_key(t: torch.Tensor) -> tuple[str, str]:
    if t.device.type == "meta":
        return ("meta", str(id(t)))
    return (str(t.device), str(t.untyped_storage().data_ptr()))


def _find_pretrained(module: Any) -> tuple[str, Any]:
    from transformers.modeling_utils import PreTrainedModel

    for prefix, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return prefix, sub
    return "", None


def audit_model(
    module: Any,
    *,
    select: list[str] | None = None,
    ignore: list[str] | None = None,
    fail_on: str | Severity = Severity.WARNING,
    probe_tokens: int = 64,
) -> Report:
    """Audit a live model (a transformers PreTrainedModel, or a wrapper such as a PeftModel around one)."""

    started = time.perf_counter()
    prefix, model = _find_pretrained(module)
    skipped: list[Skipped] = []
    declared = None
    if model is None:
        skipped.append(Skipped("declared-ties", "no transformers PreTrainedModel inside this module"))
        model = module
    state = _normalised_state(model)
    storage = {name: _storage_key(t) for name, t in state.items()}
    if model is not module or hasattr(model, "config"):
        try:
            import transformers

            config = ConfigFile("config.json", model.config.to_dict())
            arch = type(model).__name__
            active = model.get_expanded_tied_weights_keys(all_submodels=True)
            declared = ties_of_model(model, config, arch=arch, version=transformers.__version__, active=active)
            declared = _as_reloaded(declared, model.config)
        except Exception as exc:  # a module that is not a transformers model
            skipped.append(Skipped("declared-ties", f"cannot read declared ties: {exc}"))
            config = None
    else:
        config = None
    keep = _saved_names(state, storage, set(declared.potential) if declared else set())
    source = LiveTensors(state, keep, storage)
    # names dropped by the simulated save still belong to the storage groups: expose them as observed ties
    for name in set(state) - keep:
        kept = next(k for k in keep if storage[k] == storage[name])
        source.metadata.setdefault(MEMORY, {})[name] = kept
    graph = build_graph(source, declared, probes=probe_tokens)
    ctx = RuleContext(
        path=f"<{type(module).__name__}>",
        graph=graph,
        config=config,
        index_file=None,
        index_mismatches=(),
        probes=probe_tokens,
    )
    findings = run(selected(select, ignore), ctx)
    return Report(
        tool_version=__version__,
        target=Target(
            path=ctx.path,
            kind="model",
            base=None,
            layout="live",
            files=(),
            architecture=type(model).__name__ + (f" (at {prefix})" if prefix else ""),
        ),
        groups=graph.groups,
        comparisons=graph.comparisons,
        findings=tuple(findings),
        skipped=tuple(skipped),
        fail_on=severity(fail_on),
        stats=Stats(tensor_bytes_read=source.tensor_bytes, seconds=round(time.perf_counter() - started, 3)),
    )


def _as_reloaded(declared: DeclaredTies, config: Any) -> DeclaredTies:
    """Judge the flags as from_pretrained will read them back from the saved config.json: config classes
    may rewrite them on load (T5Config forces the tie back on whatever the live config says)."""
    try:
        reloaded = type(config).from_dict(config.to_dict())
    except Exception:  # a config class that cannot round-trip: keep the live values
        return declared
    flags = {}
    active = {}
    for target, source in declared.potential.items():
        flag = declared.flags[target]
        node = reloaded
        for part in flag.pointer.strip("/").split("/")[:-1]:
            node = getattr(node, part, None)
        value = bool(getattr(node, TIE_FLAG, False))
        flags[target] = replace(flag, value=value)
        if value:
            active[target] = source
    return replace(declared, flags=flags, active=active)


def _normalised_state(model: Any) -> dict[str, torch.Tensor]:
    """The state dict with PEFT's wrapper names mapped back to base names (`lm_head.base_layer.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if "lora_" in name or ".modules_to_save." in name or ".original_module." in name:
            continue
        for marker in _PEFT_MARKERS:
            name = name.replace(marker, ".")
        out.setdefault(name, t)
    return out


def _saved_names(state: dict[str, Any], storage: dict[str, tuple[str, str]], targets: set[str]) -> set[str]:
    """Of each group of names sharing a storage, save_pretrained writes one: a non-target if there is one."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in state:
        groups[storage[name]].append(name)
    keep: set[str] = set()
    for names in groups.values():
        preferred = [n for n in names if n not in targets] or names
        keep.add(preferred[0])
    return keep
