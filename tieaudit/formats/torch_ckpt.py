"""Training checkpoints of nanoGPT and llama2.c (``ckpt.pt``): a ``torch.save``d dict whose ``model`` entry is the
state dict, ``model_args`` the model's size, beside the optimizer state. Nothing in the file records the tie: each
project's ``model.py`` ties its embedding to its head unconditionally, and a tied pair is saved as two keys of one
storage. Returns data for the rules in `tieaudit/rules/torch_ckpt.py`.

The file is read with `torch.load(weights_only=True)` (`tieaudit.checkpoint.pickled`): no code in it runs. A
``torch.compile``d run prefixes every key with ``_orig_mod.``, which both projects strip before loading; so is it here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tieaudit.checkpoint.pickled import _torch_load
from tieaudit.errors import InputError, NothingToAudit

if TYPE_CHECKING:
    import torch

COMPILED_PREFIX = "_orig_mod."


@dataclass(frozen=True)
class Project:
    """A training codebase whose ``model.py`` ties a pair unconditionally, recognised by its ``model_args``."""

    name: str
    embedding: str
    head: str
    args: frozenset[str]  # model_args keys only this project's checkpoints hold
    source: str  # where its model.py ties the pair


PROJECTS = (
    Project(
        "nanoGPT",
        "transformer.wte.weight",
        "lm_head.weight",
        frozenset({"n_layer", "n_head", "n_embd", "block_size"}),
        "karpathy/nanoGPT model.py: self.transformer.wte.weight = self.lm_head.weight",
    ),
    Project(
        "llama2.c",
        "tok_embeddings.weight",
        "output.weight",
        frozenset({"dim", "n_layers", "n_heads", "multiple_of"}),
        "karpathy/llama2.c model.py: self.tok_embeddings.weight = self.output.weight",
    ),
)


@dataclass(frozen=True)
class CkptContext:
    """What the training-checkpoint rules see."""

    family: ClassVar[str] = "torch-ckpt"
    path: str
    project: Project
    stored: tuple[str, ...]  # which of (embedding, head) the state dict holds, after the prefix is stripped
    shared: bool  # both stored and on one storage (tied as saved)
    equal: bool | None  # both stored apart: bitwise equal values (None: not both stored apart, or shapes differ)
    max_abs_diff: float | None
    later: str | None  # of the two keys, the one load_state_dict copies last (it wins in the one tied Parameter)
    compiled: bool  # keys carried torch.compile's _orig_mod. prefix
    tensor_bytes: int


def is_training_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A file that is a torch zip archive (``torch.save``'s format): checked by its magic, not its name."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def analyse_ckpt(path: str) -> CkptContext:
    obj = _torch_load(Path(path), Path(path).name, mmap=True)
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("model"), dict)
        or not isinstance(obj.get("model_args"), dict)
    ):
        raise NothingToAudit(
            f"{path}: not a nanoGPT or llama2.c training checkpoint (a dict with 'model' and 'model_args')"
        )
    state: dict[str, Any] = obj["model"]
    compiled = any(isinstance(k, str) and k.startswith(COMPILED_PREFIX) for k in state)
    tensors = {(k[len(COMPILED_PREFIX) :] if k.startswith(COMPILED_PREFIX) else k): v for k, v in state.items()}
    args = set(obj["model_args"])
    project = next((p for p in PROJECTS if p.args <= args), None)
    if project is None:
        raise NothingToAudit(
            f"{path}: its model_args ({', '.join(sorted(args))[:120]}) are not nanoGPT's or llama2.c's"
        )
    stored = tuple(n for n in (project.embedding, project.head) if n in tensors)
    shared, equal, diff, later, read = False, None, None, None, 0
    if len(stored) == 2:
        a, b = tensors[project.embedding], tensors[project.head]
        _check_tensor(a, project.embedding, path)
        _check_tensor(b, project.head, path)
        shared = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape
        order = [k for k in tensors if k in (project.embedding, project.head)]
        later = order[-1]
        if not shared and a.shape == b.shape:
            equal, diff = _compare(a, b)
            read = a.numel() * a.element_size() + b.numel() * b.element_size()
    return CkptContext(path, project, stored, shared, equal, diff, later, compiled, read)


def _check_tensor(t: Any, name: str, path: str) -> None:
    import torch

    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise InputError(f"{path}: model[{name!r}] is not a matrix")


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    import torch

    if torch.equal(a, b):
        return True, 0.0
    step = max(1, (32 << 20) // max(1, a.shape[1] * 4))
    worst = 0.0
    for start in range(0, a.shape[0], step):
        d = (a[start : start + step].float() - b[start : start + step].float()).abs().max()
        worst = max(worst, float(d))
    return False, worst
