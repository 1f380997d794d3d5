"""PEFT adapter reading: the settings that change effective weights, and what the adapter file holds
for each base parameter (LoRA factors, a full `modules_to_save` copy, trainable-token rows, a saved
`base_layer` copy). Parameters are matched by the base's own names (from the tie graph), never by
hard-coded layer names. No torch import at module level; peft is never imported.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tieaudit.checkpoint.types import ConfigFile, TensorInfo
from tieaudit.errors import InputError

PREFIX = "base_model.model."
MTS_COPY = ".modules_to_save.weight"  # a modules_to_save wrapper's trained copy, under peft's internal name
MTS_ORIGINAL = ".original_module.weight"  # the same wrapper's original (base) weight
SUPPORTED_TYPES = ("LORA", "TRAINABLE_TOKENS")


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter_config.json fields that change the effective weights."""

    peft_type: str
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    base_model_name_or_path: str | None = None
    base_model_class: str | None = None  # auto_mapping.base_model_class: the class peft wrapped

    def rank(self, module: str) -> int:
        """The rank peft configures for one module: its `rank_pattern` entry, else `r` (peft's get_pattern_key)."""
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def scaling(self, module: str) -> float:
        """LoRA scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA, with alpha and r from the patterns.

        peft takes r from the config, not from the factors: a head that `ensure_weight_tying` ties to the embedding's
        factors keeps its own configured r (and so its own scaling) even when `rank_pattern` gives the embedding
        another rank."""
        alpha = self.lora_alpha
        key = _pattern_key(self.alpha_pattern, module)
        if key is not None:
            alpha = float(self.alpha_pattern[key])
        rank = self.rank(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def named(self, module: str) -> bool:
        """Whether the config names this module (target_modules, modules_to_save or trainable tokens)."""
        if isinstance(self.target_modules, str):
            if re.fullmatch(self.target_modules, module):
                return True
        elif self.target_modules and any(_suffix_match(t, module) for t in self.target_modules):
            return True
        if self.modules_to_save and any(_suffix_match(t, module) for t in self.modules_to_save):
            return True
        tti = self.trainable_token_indices
        return isinstance(tti, dict) and any(_suffix_match(t, module) for t in tti)

    def peft_ties_on_load(self) -> bool:
        """Whether peft re-ties the tied head to the embedding's adapter when loading (ensure_weight_tying):
        it does only when a configured module's leaf name is in peft's EMBEDDING_LAYER_NAMES."""
        if not self.ensure_weight_tying:
            return False
        names = ("embed_tokens", "lm_head")
        if any(m.split(".")[-1] in names for m in self.modules_to_save or []):
            return True
        if isinstance(self.target_modules, str):
            return any(re.fullmatch(self.target_modules, n) for n in names)
        return any(m.split(".")[-1] in names for m in self.target_modules or [])

    def token_indices(self, module: str) -> tuple[int, ...] | None:
        tti = self.trainable_token_indices
        if isinstance(tti, list):
            return tuple(tti)
        if isinstance(tti, dict):
            for name, idx in tti.items():
                if _suffix_match(name, module):
                    return tuple(idx)
        return None


def _suffix_match(name: str, module: str) -> bool:
    return module == name or module.endswith("." + name)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def read_settings(config: ConfigFile) -> AdapterSettings:
    """Validate and read adapter_config.json; wrong types are an InputError naming the key."""
    data = config.data
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str):
        raise InputError("adapter_config.json:/peft_type: missing or not a string")

    def typed(key: str, types: tuple[type, ...], default: Any) -> Any:
        value = data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            line = config.line_of(f"/{key}")
            where = f" (line {line})" if line else ""
            raise InputError(f"adapter_config.json:/{key}{where}: unexpected value {value!r}")
        return value

    return AdapterSettings(
        peft_type=peft_type.upper(),
        r=int(typed("r", (int,), 8)),
        lora_alpha=float(typed("lora_alpha", (int, float), 8)),
        use_rslora=bool(typed("use_rslora", (bool,), False)),
        rank_pattern=dict(typed("rank_pattern", (dict,), {})),
        alpha_pattern=dict(typed("alpha_pattern", (dict,), {})),
        target_modules=typed("target_modules", (list, str), None),
        modules_to_save=typed("modules_to_save", (list,), None),
        trainable_token_indices=typed("trainable_token_indices", (list, dict), None),
        ensure_weight_tying=bool(typed("ensure_weight_tying", (bool,), False)),
        fan_in_fan_out=bool(typed("fan_in_fan_out", (bool,), False)),
        use_dora=bool(typed("use_dora", (bool,), False)),
        base_model_name_or_path=typed("base_model_name_or_path", (str,), None),
        base_model_class=_base_model_class(data.get("auto_mapping")),
    )


def _base_model_class(auto_mapping: Any) -> str | None:
    name = auto_mapping.get("base_model_class") if isinstance(auto_mapping, dict) else None
    return name if isinstance(name, str) and name.isidentifier() else None


@dataclass(frozen=True)
class LoraPart:
    """LoRA factors of one layer. Embedding: A [r, vocab], B [hidden, r], delta = (B @ A).T * s.
    Linear: A [r, in], B [out, r], delta = B @ A * s. Both give a delta shaped like the weight."""

    kind: str  # "embedding" | "linear"
    a: str  # adapter keys
    b: str
    r: int
    scaling: float
    dora: bool = False


@dataclass(frozen=True)
class ModuleEdit:
    """Everything the adapter file holds for one base parameter."""

    param: str  # base parameter name, e.g. "lm_head.weight"
    module: str
    lora: LoraPart | None = None
    full_copy: str | None = None  # modules_to_save: the trained full copy
    base_copy: str | None = None  # PEFT's saved `base_layer.weight`
    tokens: tuple[tuple[int, ...], str] | None = None  # trainable tokens: (indices, key of their rows)
    named_in_config: bool = True

    @property
    def changes_weight(self) -> bool:
        return bool(self.lora or self.full_copy or self.tokens)


def module_edits(
    tensors: dict[str, TensorInfo], settings: AdapterSettings, params: Iterable[str]
) -> dict[str, ModuleEdit]:
    """The edits the adapter file makes to each of `params` (base parameter names)."""
    out: dict[str, ModuleEdit] = {}
    for param in params:
        module, _, leaf = param.rpartition(".")
        if leaf != "weight" or not module:
            continue
        key = f"{PREFIX}{module}"
        lora = None
        if f"{key}.lora_embedding_A" in tensors and f"{key}.lora_embedding_B" in tensors:
            a, b = f"{key}.lora_embedding_A", f"{key}.lora_embedding_B"
            r = tensors[a].shape[0]
            lora = LoraPart("embedding", a, b, r, settings.scaling(module), f"{key}.lora_magnitude_vector" in tensors)
        elif f"{key}.lora_A.weight" in tensors and f"{key}.lora_B.weight" in tensors:
            a, b = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
            r = tensors[a].shape[0]
            lora = LoraPart("linear", a, b, r, settings.scaling(module), f"{key}.lora_magnitude_vector" in tensors)
        # peft's own names for a modules_to_save wrapper's parts (saved beside `X.weight` after a vocabulary resize):
        # the trained copy, and the original module (the base weight, like a LoRA layer's base_layer)
        full = next((k for k in (f"{key}.weight", f"{key}{MTS_COPY}") if k in tensors), None)
        base = next((k for k in (f"{key}.base_layer.weight", f"{key}{MTS_ORIGINAL}") if k in tensors), None)
        tok_key = f"{key}.token_adapter.trainable_tokens_delta"
        tokens = None
        if tok_key in tensors:
            idx = settings.token_indices(module)
            if idx is None:
                raise InputError(
                    f"adapter_model holds trainable tokens for {module}, but adapter_config.json gives no indices"
                )
            tokens = (idx, tok_key)
        # trainable tokens given as a plain list apply to the input embedding, whose key holds them
        named = settings.named(module) or tokens is not None
        edit = ModuleEdit(param, module, lora, full, base, tokens, named)
        if edit.changes_weight or base:
            out[param] = edit
    return out


def fit_problems(
    edit: ModuleEdit, tensors: Mapping[str, TensorInfo], shape: tuple[int, ...], transposed: bool, where: str
) -> list[str]:
    """Why the adapter's tensors for one layer do not fit its base weight of ``shape`` (empty: they fit). ``where``
    names the base weight in the messages; ``transposed``: the weight is stored [in, out] (transformers' Conv1D).

    Embedding [vocab, hidden] and Conv1D [in, out]: A [r, rows], B [cols, r]; Linear [out, in]: A [r, in], B [out, r].
    """
    problems = []
    for key in (edit.full_copy, edit.base_copy):
        if key and tuple(tensors[key].shape) != shape:
            problems.append(f"adapter tensor {key} has shape {list(tensors[key].shape)}, {where} {list(shape)}")
    if edit.lora:
        if len(shape) != 2:
            problems.append(f"LoRA on {where}, a {len(shape)}-D weight: only Linear/Embedding layers are modelled")
        else:
            a, b = tuple(tensors[edit.lora.a].shape), tuple(tensors[edit.lora.b].shape)
            rows, cols = shape
            r = edit.lora.r
            flipped = edit.lora.kind == "embedding" or transposed
            want = ((r, rows), (cols, r)) if flipped else ((r, cols), (rows, r))
            if (a, b) != want:
                problems.append(
                    f"LoRA factors {list(a)} and {list(b)} of {edit.module} do not fit {where} {list(shape)}"
                )
    if edit.tokens:
        idx, key = edit.tokens
        got = tuple(tensors[key].shape)
        if len(shape) != 2 or got != (len(idx), shape[1]) or any(i < 0 or i >= shape[0] for i in idx):
            problems.append(f"trainable tokens {list(got)} at indices {list(idx)} do not fit {where} {list(shape)}")
    return problems


def edit_keys(edits: Iterable[ModuleEdit]) -> set[str]:
    """The adapter keys the edits read."""
    used: set[str] = set()
    for e in edits:
        used.update(k for k in (e.full_copy, e.base_copy) if k)
        if e.lora:
            used.update((e.lora.a, e.lora.b))
        if e.tokens:
            used.add(e.tokens[1])
    return used


def unmatched_keys(tensors: dict[str, TensorInfo], edits: dict[str, ModuleEdit]) -> list[str]:
    """Adapter keys of embedding-like layers the base does not have (a different base, or renamed layers)."""
    used = edit_keys(edits.values())
    suffixes = ("lora_embedding_A", "lora_embedding_B", "trainable_tokens_delta")
    return sorted(k for k in tensors if k not in used and k.endswith(suffixes))


def resolve_base(explicit: str | None, settings: AdapterSettings, adapter_root: Path) -> tuple[Path | None, str]:
    """The base checkpoint directory: --base, else base_model_name_or_path when it is a local directory or a
    repo id already in the local Hugging Face cache (offline). Returns (path, how) or (None, why not)."""
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            return path, "--base"
        cached = _from_hf_cache(explicit)
        if cached is not None:
            return cached, f"--base {explicit} (local Hugging Face cache)"
        raise InputError(f"--base {explicit}: not a directory, and not a repo id in the local Hugging Face cache")
    name = settings.base_model_name_or_path
    if not name:
        return None, "adapter_config.json has no base_model_name_or_path; pass --base BASE"
    for candidate in (Path(name), Path(os.path.normpath(adapter_root / name))):
        if candidate.is_dir():
            return candidate, f"base_model_name_or_path {name}"
    cached = _from_hf_cache(name)
    if cached is not None:
        return cached, f"base_model_name_or_path {name} (local Hugging Face cache)"
    return None, f"base {name!r} is neither a local directory nor in the local Hugging Face cache; pass --base BASE"


def _from_hf_cache(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` at main, looked up as a PATH's (tieaudit.checkpoint.hub); None when it is not
    a repo id or not usable from the cache (the caller reports it)."""
    from tieaudit.checkpoint.hub import cached_snapshot, looks_like_repo_id  # lazy: only for a base named by Hub id

    if not looks_like_repo_id(repo_id):
        return None
    try:
        return Path(cached_snapshot(repo_id, None)[0])
    except InputError:
        return None
