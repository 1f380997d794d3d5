"""Readers other than transformers that decide from a checkpoint's config whether the output head is tied.

transformers' own choice is the governing flag of each tie (``tieaudit.ties.declared``). The readers here ask a
different config object in some checkpoints (a composite model's ``text_config``, an encoder-decoder's decoder).
Each entry records, from that reader's source at the version named (docs/readers.md has the file and line):

- ``flag_config``: the config object whose ``tie_word_embeddings`` it reads, given the model transformers builds
  (None: the reader does not read a tie flag for this model at all);
- ``consequence``: what it then does with *this* checkpoint's stored tensors when its value differs from
  transformers' (``Consequence``), so TIE005's severity follows what a user of that reader would get.

Adding a reader means adding an entry here, its evidence to docs/readers.md, and a case to tests/test_readers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tieaudit.checkpoint.config import escape_pointer_token, literal, pointer_parts
from tieaudit.model import Severity
from tieaudit.ties import vllm_registry as vllm


@dataclass(frozen=True)
class Consequence:
    """What a reader loads differently from transformers, for one head pair of one checkpoint."""

    severity: Severity  # WARNING: wrong weights or a load failure; INFO: nothing loads differently
    text: str  # e.g. "reads false: it finds no lm_head.weight and serves an uninitialised head"


@dataclass(frozen=True)
class HeadState:
    """What the checkpoint stores for the output head's pair (names as the model holds them)."""

    head: str
    embedding: str
    head_stored: bool
    equal: bool | None  # the stored head is bitwise equal to the embedding (None: not compared or not stored)
    safetensors: bool  # the checkpoint is in safetensors files (some readers inspect their headers)


@dataclass(frozen=True)
class Reader:
    name: str  # shown to users, e.g. "accelerate"
    verified: str  # the version whose source the entry was checked against
    # (model, hf_config) -> (the config object whose flag it reads, or None when it does not read one for this model;
    # the value it uses whatever that flag says, or None when it follows the flag)
    flag_config: Callable[[Any, Any], tuple[Any | None, bool | None]]
    # (what it reads, what is stored) -> what it loads differently from transformers
    consequence: Callable[[ReaderView, HeadState], Consequence]


@dataclass(frozen=True)
class ReaderView:
    """What one reader makes of the head's tie flag in one checkpoint."""

    reader: str  # a key of READERS
    pointer: str  # JSON pointer of the flag it reads
    value: bool  # the value it uses
    forced: bool  # it uses `value` whatever the flag says (the model class always or never ties)


TIE_FLAG = "tie_word_embeddings"  # the one definition (declared, live and the repair planner import it)
TOP = f"/{TIE_FLAG}"


def _accelerate_config(model: Any, hf_config: Any) -> tuple[Any | None, bool | None]:
    # accelerate/utils/modeling.py check_tied_parameters_in_config: get_text_config(decoder=True) when the config
    # has it, and only for a model with output embeddings
    try:
        if model.get_output_embeddings() is None:
            return None, None
    except Exception:
        return None, None
    getter = getattr(hf_config, "get_text_config", None)
    return (getter(decoder=True) if callable(getter) else hf_config), None


def _accelerate_consequence(view: ReaderView, state: HeadState) -> Consequence:
    if view.value:  # it expects a tie transformers does not make
        text = (
            'reads true: it logs "The model weights are not tied. Please use the `tie_weights` method before using '
            'the `infer_auto_device` function." when it places the model on devices, and loads no weight differently'
        )
    else:
        text = "reads false: it skips its tied-weights warning and loads no weight differently"
    return Consequence(Severity.INFO, text)


def _vllm_config(model: Any, hf_config: Any) -> tuple[Any | None, bool | None]:
    archs = getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else type(model).__name__
    if arch not in vllm.ARCHITECTURES:
        return None, None  # not served natively (its Transformers backend is not modelled)
    if arch in vllm.ALWAYS_TIES:
        return hf_config, True
    if arch in vllm.NEVER_TIES:
        return hf_config, False
    if arch in vllm.MULTIMODAL and not hasattr(hf_config, TIE_FLAG):
        getter = getattr(hf_config, "get_text_config", None)
        return (getter() if callable(getter) else hf_config), None
    return hf_config, None  # the top-level flag (copied into a composite's language model config)


def _vllm_consequence(view: ReaderView, state: HeadState) -> Consequence:
    head, emb = state.head, state.embedding
    if view.forced:
        how = "always ties the head (whatever the flag says)" if view.value else "never ties the head"
    else:
        how = f"reads {literal(view.value)}"
    if not view.value:
        if not state.head_stored:
            return Consequence(
                Severity.WARNING,
                f"{how}: it finds no {head} and serves an uninitialised "
                "head (no error, no fallback to the embedding): garbage output",
            )
        return Consequence(Severity.INFO, f"{how} and loads the stored {head} as a separate head")
    if not state.head_stored:
        return Consequence(Severity.INFO, f"{how} and serves {emb} as the head")
    if state.equal:
        return Consequence(Severity.INFO, f"{how}; the stored {head} equals {emb}, so it serves the same weights")
    if not view.forced and view.pointer == TOP and state.safetensors:
        return Consequence(
            Severity.INFO,
            f"{how}, but unties because the safetensors files hold {head}, and serves the stored head with a warning",
        )
    return Consequence(
        Severity.WARNING,
        f"{how} and discards the stored {head} (debug log only), serving {emb} as the head"
        + (" or failing to load it" if view.forced else ""),
    )


READERS: dict[str, Reader] = {
    "accelerate": Reader(
        name="accelerate",
        verified="1.15.0",
        flag_config=_accelerate_config,
        consequence=_accelerate_consequence,
    ),
    "vllm": Reader(
        name="vLLM",
        verified=vllm.VERSION,  # the release tools/vllm_table.py read
        flag_config=_vllm_config,
        consequence=_vllm_consequence,
    ),
}


def flag_copies(data: Mapping[str, Any], governing: str) -> list[str]:
    """Every other key of config.json (as parsed: ``data``) where a reader of the raw JSON may look for the
    governing flag at ``governing``: the top level and every sub-config that has the flag (``text_config`` always).
    `tieaudit fix` writes the same value to all of them, so no reader, modelled or not, sees another."""
    found = []
    if governing != f"/{TIE_FLAG}":
        found.append(f"/{TIE_FLAG}")
    for key, value in data.items():
        pointer = f"/{escape_pointer_token(key)}/{TIE_FLAG}"
        if isinstance(value, dict) and (TIE_FLAG in value or key == "text_config") and pointer != governing:
            found.append(pointer)
    return [p for p in found if len(pointer_parts(p)) == 1 or isinstance(data.get(pointer_parts(p)[0]), dict)]
