"""Zoo sweep, step one: enumerate every tie-declaring model class transformers ships and build tiny copies of them.

Importable (``tied_classes``, ``shrink``, ``build``) and a CLI::

    python tools/zoo.py list
    python tools/zoo.py build OUT_DIR [--classes A,B] [--jobs N] [--variants clean,...] [--timeout S]

``build`` writes ``OUT_DIR/<Class>/<variant>/`` (a ``save_pretrained`` directory) per class and prints a summary.
Every class is built in a worker subprocess with a per-class timeout; a worker that hangs or dies is replaced, so one
class can never stop the sweep.

The shrinker is generic: it only looks at config field *names* and values (never at model names). See ``shrink``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

VARIANTS = ("clean", "tied_clean", "untied_clean", "untied_missing", "diverged")
DEFAULT_TIMEOUT = 120.0
TIE_FLAG = "tie_word_embeddings"

# Classes the generic shrinker cannot build tiny (transformers 5.24), with the reason; every other class that does not
# build is reported as failed (or as skipped when its own default config does not build either). Keep this short:
# a new transformers release should shrink this list, and `python tools/zoo.py build DIR --classes X` re-checks one.
SKIP: dict[str, str] = {
    "Apertus1p5ForConditionalGeneration": "its validator ties image, audio and text token-id ranges together",
    "CsmForConditionalGeneration": "no shrink plan builds within the per-class time limit (nested depth decoder)",
    "Dots3NoteForCausalLM": "per_layer_config is keyed by the default's 45 layer indices",
    "Dots3NoteForConditionalGeneration": "per_layer_config is keyed by the default's 45 layer indices",
    "Emu3ForConditionalGeneration": "its default config does not build; shrink attempts exhaust memory",
    "Ernie4_5_VLMoeForConditionalGeneration": "vision MoE sizes derive from defaults the shrinker cannot see",
    "FalconH1ForCausalLM": "its validator ties Mamba head state to intermediate_size",
    "FunAsrNanoForConditionalGeneration": "its validator ties the adaptor size to text_config.hidden_size // 4",
    "HYV4VLForConditionalGeneration": "its validator ties mrope_section to qk_rope_head_dim",
    "KyutaiSpeechToTextForConditionalGeneration": "its codec's grouped convolutions need the default widths",
}


def default_dir() -> Path:
    """Where the test suite keeps the zoo of the installed versions: ``$TIEAUDIT_ZOO_DIR`` (else
    ``~/.cache/tieaudit-zoo``) / ``transformers-<version>-<hash of the versions and of this file>``."""
    import hashlib
    from importlib.metadata import version

    key = hashlib.sha256(
        "\n".join([version("transformers"), version("torch"), Path(__file__).read_text()]).encode()
    ).hexdigest()[:16]
    base = Path(os.environ.get("TIEAUDIT_ZOO_DIR") or Path.home() / ".cache" / "tieaudit-zoo")
    return base / f"transformers-{version('transformers')}-{key}"


# --------------------------------------------------------------------------------------------------------------------
# Enumeration
# --------------------------------------------------------------------------------------------------------------------


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


def auto_classes() -> list[str]:
    """Every model class name in the ``MODEL_*_MAPPING_NAMES`` dicts of ``modeling_auto``, deduplicated, sorted."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if not (attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES")):
            continue
        mapping = getattr(modeling_auto, attr)
        if not isinstance(mapping, dict):
            continue
        for value in mapping.values():
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, (list, tuple)):
                names.update(v for v in value if isinstance(v, str))
    return sorted(names)


def model_class(name: str) -> type[PreTrainedModel]:
    import transformers

    cls: type[PreTrainedModel] = getattr(transformers, name)
    return cls


def _declares_ties_on_class(cls: type[Any]) -> bool:
    return bool(getattr(cls, "_tied_weights_keys", None))


def declared_tied_keys(model: torch.nn.Module) -> list[str]:
    """The declared (config-independent) tie targets of every submodule, like ``_get_tied_weight_keys``."""
    from transformers.modeling_utils import _get_tied_weight_keys

    return list(_get_tied_weight_keys(model))


def _declares_ties_by_building(name: str) -> bool | None:
    """Build on the meta device (shrunk config first, default config second); None when neither builds."""
    import torch

    cls = model_class(name)
    for config in _config_candidates(cls):
        try:
            with torch.device("meta"):
                model = cls(config)
        except Exception:
            continue
        return bool(getattr(model, "all_tied_weights_keys", None)) or bool(declared_tied_keys(model))
    return None


def _config_candidates(cls: type[PreTrainedModel]) -> Iterator[PretrainedConfig]:
    for params in SHRINK_PLANS[:1]:
        try:
            yield shrink(cls.config_class(), params)
        except Exception:
            continue
    with contextlib.suppress(Exception):
        yield cls.config_class()


def tied_classes(undetermined: list[str] | None = None) -> list[str]:
    """Sorted names of auto-mapped model classes that declare ties.

    A class declares ties when ``_tied_weights_keys`` is non-empty on the class itself, or on a submodule it builds
    (checked by building it on the meta device). Classes whose check fails are appended to ``undetermined``.
    """
    _quiet()
    import transformers

    out: list[str] = []
    for name in auto_classes():
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        if _declares_ties_on_class(cls):
            out.append(name)
            continue
        verdict = _declares_ties_by_building(name)
        if verdict:
            out.append(name)
        elif verdict is None and undetermined is not None:
            undetermined.append(name)
    return sorted(out)


# --------------------------------------------------------------------------------------------------------------------
# Generic config shrinker
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShrinkPlan:
    """Target sizes for one shrink attempt."""

    hidden: int = 64
    heads: int = 2
    kv_heads: int = 2
    layers: int = 2
    intermediate: int = 128
    vocab: int = 128
    positions: int = 512
    experts: int = 4
    experts_per_tok: int = 2
    channels: int = 32  # a multiple of the 32 groups GroupNorm layers default to
    shrink_lists: bool = True
    keep_layers: bool = False  # leave every layer count (and per-layer list) as the default config has it
    keep_vocab: bool = False  # leave vocab sizes alone (token-id *ranges* can depend on them)
    remap_ids: bool = True  # move large special-token ids into the small vocab (else: raise the vocab above them)


# Tried in order until one builds.
SHRINK_PLANS: tuple[ShrinkPlan, ...] = (
    ShrinkPlan(),
    ShrinkPlan(hidden=128, heads=4, kv_heads=2, intermediate=256),
    ShrinkPlan(layers=4),
    ShrinkPlan(keep_layers=True),
    ShrinkPlan(intermediate=64),
    ShrinkPlan(keep_vocab=True),
    ShrinkPlan(keep_layers=True, keep_vocab=True, intermediate=64),
    ShrinkPlan(hidden=128, heads=4, kv_heads=2, intermediate=256, layers=4, positions=4096),
    ShrinkPlan(hidden=256, heads=4, kv_heads=4, intermediate=512, layers=4, positions=4096, shrink_lists=False),
)

_TOKEN_ID = re.compile(r"(^|_)(token_id|token_index|token_ids|id)$|_token_(id|index)$|^(bos|eos|pad|sep|cls|mask|unk)_")
_NOT_TOKEN_ID = re.compile(r"layer|stride|seed|label|ignore|offset|vocab|num_|max_|_size$")
_VOCAB = re.compile(r"(^|_)vocab_size$|^n_vocab$|vocab_size$")
# other table sizes: per-layer or hashed vocabularies, codebooks
_VOCAB_LIKE = re.compile(r"vocab|^num_embeddings$|^codebook_size$")
# convolution widths (audio codecs, vocoders, VQ encoders): the multipliers stay, the base width shrinks
_CHANNELS = re.compile(
    r"^(n|num)_filters$|_filters$|^base_channels$|^upsample_initial_channel$|^(hidden|base)_channels$"
)
_TOTAL_LAYERS = re.compile(
    r"^(num_hidden_layers|num_layers|n_layers?|encoder_layers|decoder_layers|num_(encoder|decoder)_layers|depth"
    r"|[a-z0-9]+_num_(hidden_)?layers|num_[a-z0-9]+_layers|[a-z0-9]+_depth)$"
)
_SUB_LAYERS = re.compile(r"layers?$|_layer$")
_POSITIONS = re.compile(
    r"max_(\w+_)?position(s|_embeddings)$|^n_positions$|^n_ctx$|^max_(\w+_)?positions$|^max_seq_len$"
)
_KV_HEADS = re.compile(r"(key_value|kv)_(attention_)?heads$|^num_query_groups$|^multi_query_group_num$|kv_heads$")
_HEADS = re.compile(r"heads$|^n_head$|^num_head$")
_ROPE_HEAD = re.compile(r"rope.*(head_)?dim$|rope_head_dim$|nope_head_dim$")
_HEAD_DIM = re.compile(r"head_dim$|^d_kv$|^dim_head$|^kv_channels$|_head_dim$|^attention_head_size$|^d_head$")
_RANK = re.compile(r"lora_rank$|_rank$")
_INTERMEDIATE = re.compile(
    r"intermediate|ffn|(^|_)d_ff$|^n_inner$|feedforward|feed_forward|^mlp_dim$|^d_inner$|linear_units$|^dff$|^dim_ff$"
)
_EXPERTS_PER_TOK = re.compile(r"experts_per_tok(en)?$|^moe_topk$|^moe_k$|^top_k$|^num_selected_experts$")
_EXPERTS = re.compile(r"(num|n|moe_num)_(local_|routed_)?experts$|^num_experts$")
_EXPERT_GROUPS = re.compile(r"^(n_group|topk_group|num_expert_group|n_shared_experts|num_shared_experts)$")
_HIDDEN = re.compile(
    r"^(hidden_size|d_model|n_embd|n_embed|embed_dim|emb_dim|embedding_size|embedding_dim|hidden_dim|model_dim|dim|width"
    r"|word_embed_proj_dim|projection_dim|proj_dim|d_embed)$"
    r"|_hidden_size$|_embed_dim$|_hidden_dim$|_embedding_dim$|_embedding_size$|_proj_dim$|_projection_dim$"
    r"|^adapter_(in|out)_dim$|_(in|out)_hidden_dim$"
)
_HIDDEN_EXCLUDE = re.compile(r"per_layer|frequency|position|bbox|rel|speaker|lang|spkr|pos_|_pos|bin|kernel|ple")
_LIST_HIDDEN = re.compile(
    r"^(hidden_sizes|embed_dims|embed_dim|neck_hidden_sizes|embed_dim_per_stage|embedding_dimension)$"
)
_LIST_DEPTHS = re.compile(r"^(depths|blocks_per_stage|stage_num_blocks|num_block_repeats|block_repeats)$")
_LIST_HEADS = re.compile(r"heads")
_LAYER_INDEX_LIST = re.compile(r"index|indices|indexes|idxs|layer_ids|_layers$|layer$|layers_")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sub_configs(config: PretrainedConfig) -> Iterator[tuple[str, PretrainedConfig]]:
    from transformers import PretrainedConfig

    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            yield key, value


def _walk(config: PretrainedConfig, seen: set[int] | None = None) -> Iterator[PretrainedConfig]:
    seen = set() if seen is None else seen
    if id(config) in seen:
        return
    seen.add(id(config))
    yield config
    for _, sub in _sub_configs(config):
        yield from _walk(sub, seen)


def _token_ids(config: PretrainedConfig) -> Iterator[int]:
    for key, value in vars(config).items():
        if not _TOKEN_ID.search(key) or _NOT_TOKEN_ID.search(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        yield from (v for v in values if _is_int(v))


def _set(config: PretrainedConfig, key: str, value: Any) -> None:
    with contextlib.suppress(Exception):
        setattr(config, key, value)


def _shrink_one(config: PretrainedConfig, plan: ShrinkPlan, min_vocab: int) -> None:
    fields = dict(vars(config))
    old_layers = max((v for k, v in fields.items() if _is_int(v) and _TOTAL_LAYERS.match(k)), default=None)
    list_lengths = {len(v) for v in fields.values() if isinstance(v, (list, tuple))}
    head_dim = plan.hidden // plan.heads
    for key, value in fields.items():
        if key.startswith("_") or key in ("tie_word_embeddings", "num_labels"):
            continue
        new: Any = None
        if value is None:
            new = _fill_none(key, plan, head_dim)
        elif _is_int(value):
            if not _TOTAL_LAYERS.match(key) and _SUB_LAYERS.search(key) and value in list_lengths:
                continue  # a count of list items (e.g. convolution stages), not of transformer layers
            new = _shrink_int(key, value, plan, head_dim, min_vocab)
        elif isinstance(value, (list, tuple)) and plan.shrink_lists:
            shrunk = _shrink_list(key, list(value), plan, old_layers)
            new = type(value)(shrunk) if shrunk is not None else None
        if new is not None and new != value:
            _set(config, key, new)
    _fix_state_space_heads(config)
    _fix_rope_sections(config, head_dim)


def _fill_none(key: str, plan: ShrinkPlan, head_dim: int) -> int | None:
    """Some default configs leave a derived size unset (None) although the model needs it."""
    if key == "head_dim":
        return head_dim
    if key in ("num_key_value_heads", "num_kv_heads"):
        return plan.kv_heads
    if key == "vocab_size":
        return plan.vocab
    return None


def _fix_state_space_heads(config: PretrainedConfig) -> None:
    """State-space blocks need ``<p>n_heads * <p>head_dim == <p>expand * hidden_size``: re-derive the head dim."""
    hidden = getattr(config, "hidden_size", None)
    for key, expand in list(vars(config).items()):
        if not key.endswith("expand") or not _is_int(expand) or not _is_int(hidden):
            continue
        prefix = key[: -len("expand")]
        heads_key = next(
            (prefix + k for k in ("n_heads", "num_heads") if _is_int(getattr(config, prefix + k, None))), None
        )
        dim_key = next((prefix + k for k in ("d_head", "head_dim", "headdim") if hasattr(config, prefix + k)), None)
        if heads_key is None or dim_key is None:
            continue
        heads = getattr(config, heads_key)
        inner = expand * hidden
        if inner % heads:
            heads = 1
            _set(config, heads_key, heads)
        _set(config, dim_key, inner // heads)


def _shrink_int(key: str, value: int, plan: ShrinkPlan, head_dim: int, min_vocab: int) -> int | None:
    if value <= 0:
        return None
    if _TOKEN_ID.search(key) and not _NOT_TOKEN_ID.search(key):
        return None
    if _VOCAB.search(key) or _VOCAB_LIKE.search(key):
        if plan.keep_vocab:
            return None
        if key == "vocab_size":
            return max(plan.vocab, min_vocab)
        return min(value, plan.vocab) if value > plan.vocab else None
    if _CHANNELS.search(key):
        return min(value, plan.channels)
    if _POSITIONS.search(key):
        return min(value, plan.positions)
    if _TOTAL_LAYERS.match(key):
        return None if plan.keep_layers else min(value, plan.layers)
    if _SUB_LAYERS.search(key) and "num" in key and "window" not in key:
        return None if plan.keep_layers else min(value, max(plan.layers // 2, 1))
    if key == "max_window_layers":
        return None if plan.keep_layers else min(value, plan.layers)
    if _KV_HEADS.search(key):
        return 1 if value == 1 else min(value, plan.kv_heads)
    if _HEADS.search(key):
        return min(value, plan.heads)
    if _ROPE_HEAD.search(key):
        return min(value, head_dim // 2)
    if _HEAD_DIM.search(key):
        return head_dim
    if _RANK.search(key):
        return min(value, 16)
    if _EXPERTS_PER_TOK.search(key):
        return min(value, plan.experts_per_tok)
    if _EXPERT_GROUPS.match(key):
        return 1
    if _EXPERTS.search(key):
        return min(value, plan.experts)
    if _INTERMEDIATE.search(key):
        return plan.intermediate if value > plan.intermediate else None
    if _HIDDEN.search(key) and not _HIDDEN_EXCLUDE.search(key):
        return plan.hidden if value > plan.hidden else None
    return None


def _shrink_list(key: str, value: list[Any], plan: ShrinkPlan, old_layers: int | None) -> list[Any] | None:
    ints = bool(value) and all(_is_int(v) for v in value)
    out = list(value)
    if ints and _LIST_HIDDEN.match(key):
        out = [min(v, plan.hidden) for v in value]
    elif ints and _LIST_DEPTHS.match(key) and not plan.keep_layers:
        out = [min(v, 1) if v > 0 else v for v in value]
    elif ints and _LIST_HEADS.search(key):
        out = [min(v, plan.heads) for v in value]
    elif ints and _LAYER_INDEX_LIST.search(key) and old_layers is not None and len(value) != old_layers:
        if old_layers > plan.layers and not plan.keep_layers:
            out = [v for v in value if -plan.layers <= v < plan.layers]
            if not out:
                out = [plan.layers - 1] if all(v >= 0 for v in value) else [-1]
        return out
    if old_layers is not None and len(out) == old_layers and old_layers > plan.layers and not plan.keep_layers:
        out = out[: plan.layers]
    return out


def _fix_rope_sections(config: PretrainedConfig, head_dim: int) -> None:
    """Rescale rotary ``*section*`` lists (they must sum to head_dim // 2) inside rope dicts."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, key, None)
        if not isinstance(rope, dict):
            continue
        dim = vars(config).get("head_dim") or head_dim  # not getattr: per-layer configs refuse global reads
        for name, value in list(rope.items()):
            if "section" in name and isinstance(value, list) and value and all(_is_int(v) for v in value):
                rope[name] = _proportional(value, dim // 2)


def _proportional(parts: list[int], total: int) -> list[int]:
    old = sum(parts)
    if old == total or old == 0:
        return parts
    new = [max(1, p * total // old) for p in parts]
    new[0] += total - sum(new)
    return new


def shrink(config: PretrainedConfig, plan: ShrinkPlan | None = None) -> PretrainedConfig:
    """Shrink ``config`` (and every sub-config) in place, generically by field name; returns it.

    Token-id fields keep their order: with ``plan.remap_ids`` the distinct ids of the whole config tree that do not fit
    the small vocab move to its top (ascending), otherwise vocab sizes are raised above the largest id.
    ``tie_word_embeddings`` is left as the config has it.
    """
    plan = plan or SHRINK_PLANS[0]
    configs = list(_walk(config))
    ids = sorted({i for c in configs for i in _token_ids(c)})
    max_id = ids[-1] if ids else -1
    if plan.remap_ids and not plan.keep_vocab and max_id >= plan.vocab:
        if len(ids) > plan.vocab // 2:
            raise ValueError(f"{len(ids)} distinct token ids do not fit a vocab of {plan.vocab}")
        mapping = {old: plan.vocab - len(ids) + n for n, old in enumerate(ids)}
        for sub in configs:
            _remap_token_ids(sub, mapping)
        max_id = plan.vocab - 1
    min_vocab = max(plan.vocab, max_id + 1)
    for sub in configs:
        _shrink_one(sub, plan, min_vocab)
    return config


def _remap_token_ids(config: PretrainedConfig, mapping: dict[int, int]) -> None:
    for key, value in list(vars(config).items()):
        if not _TOKEN_ID.search(key) or _NOT_TOKEN_ID.search(key):
            continue
        if _is_int(value):
            _set(config, key, mapping.get(value, value))
        elif isinstance(value, (list, tuple)):
            _set(config, key, type(value)(mapping.get(v, v) if _is_int(v) else v for v in value))


# --------------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------------


# Convolution widths shrink hardest first (a codec's width doubles per stage: 8 filters end at a few hundred
# channels), then to GroupNorm's 32 groups, then not at all; token ids are remapped, else the vocab is raised.
_KEEP = 1 << 30
_ROUNDS: tuple[dict[str, Any], ...] = (
    {"channels": 8},
    {"channels": 32},
    {"channels": _KEEP},
    {"remap_ids": False, "channels": 32},
    {"remap_ids": False, "channels": _KEEP},
)


def _plans() -> Iterator[ShrinkPlan]:
    """Every shrink plan in every round of ``_ROUNDS``."""
    for round_ in _ROUNDS:
        for plan in SHRINK_PLANS:
            yield dataclasses.replace(plan, **round_)


def _set_tie_flags(config: PretrainedConfig, value: bool) -> None:
    for sub in _walk(config):
        if hasattr(sub, TIE_FLAG):
            _set(sub, TIE_FLAG, value)


def _instantiate(name: str, *, tie_flags: bool | None = None) -> tuple[PreTrainedModel, int]:
    """Build ``name`` tiny on CPU, trying each shrink plan; returns the model and the plan index that worked.

    A plan counts only if its config survives the round trip ``save_pretrained`` / ``from_pretrained`` makes (JSON,
    then the config class's own validation). ``tie_flags`` sets every ``tie_word_embeddings`` of the config tree.
    """
    import torch

    cls = model_class(name)
    errors: list[BaseException] = []
    for index, plan in enumerate(_plans()):
        try:
            config = shrink(cls.config_class(), plan)
            if tie_flags is not None:
                _set_tie_flags(config, tie_flags)
            reloaded = _round_trip(config)
            for candidate in (config, reloaded):
                validate = getattr(candidate, "validate", None)
                if callable(validate):
                    validate()  # save_pretrained and from_pretrained validate strictly: let the next plan try
            torch.manual_seed(0)
            with torch.device("cpu"):
                model = cls(config)
        except Exception as exc:
            errors.append(exc)
            continue
        model = model.to(torch.float32).eval()
        return model, index
    raise errors[0]


def _round_trip(config: PretrainedConfig) -> PretrainedConfig:
    """The config as ``from_pretrained`` will read it back after ``save_pretrained``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return type(config).from_pretrained(tmp)


def _governing_configs(model: PreTrainedModel) -> list[Any]:
    """Configs of the (sub)models whose own config enables a non-empty tie mapping."""
    from transformers import PreTrainedModel

    out: list[Any] = []
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or any(module.config is c for c in out):
            continue
        if module.get_expanded_tied_weights_keys(all_submodels=False):
            out.append(module.config)
    return out


def _active_pairs(model: PreTrainedModel) -> dict[str, str]:
    return dict(getattr(model, "all_tied_weights_keys", {}) or {})


def _replace_param(model: PreTrainedModel, name: str, value: torch.Tensor) -> None:
    import torch

    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, param_name, torch.nn.Parameter(value))


def _randomise(model: PreTrainedModel, names: set[str]) -> None:
    """Give the tie members values no initialiser produces (a bias initialised to zeros would load back as zeros
    and hide a dropped tensor): seeded noise added in place, so tied names keep sharing one Parameter."""
    import torch

    generator = torch.Generator().manual_seed(2)
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    with torch.no_grad():
        for name in sorted(names):
            param = params.get(name)
            if param is None or id(param) in done or not param.is_floating_point():
                continue
            done.add(id(param))
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.02)


def _apply_variant(model: PreTrainedModel, variant: str, pairs: dict[str, str]) -> None:
    """Mutate a tied ``model`` (its active tie map is ``pairs``) into ``variant``."""
    import torch

    if variant in ("clean", "tied_clean"):
        return
    if variant == "untied_missing":
        # weights stay shared, so save_pretrained drops the tied targets while the config now says "untied"
        for config in _governing_configs(model):
            config.tie_word_embeddings = False
        return
    if variant == "untied_clean":
        # a deliberate untie: separate copies with equal values under an untied flag
        governing = _governing_configs(model)
        for target in pairs:
            _replace_param(model, target, model.get_parameter(target).detach().clone())
        for config in governing:
            config.tie_word_embeddings = False
        return
    if variant == "diverged":
        generator = torch.Generator().manual_seed(1)
        for target in pairs:
            old = model.get_parameter(target)
            noise = torch.randn(old.shape, generator=generator, dtype=old.dtype) * 0.02 + 0.01
            _replace_param(model, target, old.detach().clone() + noise)
        return
    raise ValueError(f"unknown variant {variant!r}")


class NotApplicable(Exception):
    """The variant does not apply to this class (e.g. nothing is tied under its default config)."""


def build(class_name: str, out_dir: str | os.PathLike[str], variant: str = "clean") -> dict[str, Any]:
    """Build a tiny seeded float32 ``class_name`` on CPU, turn it into ``variant`` and ``save_pretrained`` it.

    Returns a JSON-able record (plan index, parameter count, tie pairs).
    """
    _quiet()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    model, plan_index = _instantiate(class_name)
    pairs = _active_pairs(model)
    if variant != "clean" and not pairs:
        raise NotApplicable("no active tie (all_tied_weights_keys is empty)")
    _apply_variant(model, variant, pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return {
        "plan": plan_index,
        "params": sum(p.numel() for p in model.parameters()),
        "tied_pairs": len(pairs),
        "declared": len(declared_tied_keys(model)),
    }


# --------------------------------------------------------------------------------------------------------------------
# One class, every variant, and the truth from a real from_pretrained
# --------------------------------------------------------------------------------------------------------------------


def truth(cls: type[PreTrainedModel], directory: Path, intended: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load ``directory`` with ``from_pretrained`` and compare every tensor of ``intended`` (the tie members, as the
    model held them in memory when it was saved) bit for bit, then again after ``model.tie_weights()`` (which
    resizing, peft and many training scripts call): ``intact``, ``broken`` / ``broken-after-tie-weights`` (with the
    names that differ) or ``load-error``."""
    try:
        loaded = cls.from_pretrained(directory)
    except Exception as exc:
        return {"truth": "load-error", "reason": _reason(exc)}
    differ = _differ(loaded, intended)
    if differ:
        return {"truth": "broken", "differ": differ}
    loaded.tie_weights()
    differ = _differ(loaded, intended)
    return {"truth": "broken-after-tie-weights", "differ": differ} if differ else {"truth": "intact"}


def _differ(model: PreTrainedModel, intended: dict[str, torch.Tensor]) -> list[str]:
    import torch

    state = model.state_dict()
    return sorted(
        name
        for name, want in intended.items()
        if name not in state or state[name].shape != want.shape or not torch.equal(state[name].float(), want.float())
    )


LAYOUTS = ("safetensors", "sharded", "bin")
LAYOUT_SAMPLE_EVERY = 20  # every 20th class (sorted) is also saved sharded and as a .bin


def save(model: PreTrainedModel, out: Path, layout: str = "safetensors") -> None:
    """``save_pretrained`` into ``out``; ``sharded`` splits the weights into several files with an index, ``bin``
    rewrites what ``save_pretrained`` kept as one ``pytorch_model.bin`` (the transformers-v4 format)."""
    import torch
    from safetensors.torch import load_file

    if layout == "safetensors":
        model.save_pretrained(out)
    elif layout == "sharded":
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(out, max_shard_size=max(total // 4, 1024))
    elif layout == "bin":
        model.save_pretrained(out)
        state: dict[str, torch.Tensor] = {}
        for path in sorted(out.glob("*.safetensors")):
            state.update(load_file(str(path)))
            path.unlink()
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
        torch.save(state, out / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def checkpoint_name(variant: str, layout: str) -> str:
    return variant if layout == "safetensors" else f"{variant}.{layout}"


def run_class(
    class_name: str,
    out_root: str | os.PathLike[str],
    variants: tuple[str, ...] = VARIANTS,
    layouts: tuple[str, ...] = ("safetensors",),
) -> dict[str, Any]:
    """Build ``class_name`` once, save every applicable variant in every layout under ``out_root/<variant>[.layout]/``
    and measure its truth.

    A class whose default config ties nothing is also built with every ``tie_word_embeddings`` set true
    (``tied_clean``); the tied variants derive from whichever build ties. Returns ``{"plan": .., "variants": {..}}``.
    """
    import copy

    _quiet()
    cls = model_class(class_name)
    model, plan_index = _instantiate(class_name)
    record: dict[str, Any] = {"plan": plan_index, "declared": len(declared_tied_keys(model)), "variants": {}}
    tied, pairs = model, _active_pairs(model)
    if not pairs:
        try:
            tied, _ = _instantiate(class_name, tie_flags=True)
            pairs = _active_pairs(tied)
        except Exception as exc:
            record["tied_build"] = _reason(exc)
    record["tied_pairs"] = len(pairs)
    for built in {id(model): model, id(tied): tied}.values():
        _randomise(built, set(pairs.values()) | set(pairs))
    for variant in variants:
        if variant == "clean":
            subject = model
        elif not pairs:
            record["variants"][variant] = {"status": "n/a", "reason": "nothing ties, even with every flag set true"}
            continue
        elif variant == "tied_clean" and tied is model:
            continue  # the default config ties: "clean" is this variant
        else:
            subject = copy.deepcopy(tied)
        try:
            _apply_variant(subject, variant, pairs)
        except Exception as exc:
            record["variants"][variant] = {"status": "failed", "reason": _reason(exc)}
            continue
        for layout in layouts:
            start = time.monotonic()
            entry: dict[str, Any]
            try:
                out = Path(out_root) / checkpoint_name(variant, layout)
                out.mkdir(parents=True, exist_ok=True)
                save(subject, out, layout)
                members = set(pairs) | set(pairs.values())
                state = subject.state_dict()
                intended = {n: state[n].detach().clone() for n in sorted(members) if n in state}
                entry = {"status": "built", **truth(cls, out, intended)}
            except Exception as exc:
                entry = {"status": "failed", "reason": _reason(exc)}
            entry["seconds"] = round(time.monotonic() - start, 2)
            record["variants"][checkpoint_name(variant, layout)] = entry
    return record


# --------------------------------------------------------------------------------------------------------------------
# Worker subprocesses
# --------------------------------------------------------------------------------------------------------------------


def _worker_main() -> None:
    """Read JSON tasks on stdin, answer one JSON line per task on the original stdout."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    _quiet()
    import torch

    torch.set_num_threads(1)
    for line in sys.stdin:
        task = json.loads(line)
        start = time.monotonic()
        try:
            if task.get("variants"):
                result: dict[str, Any] = {
                    "status": "built",
                    **run_class(task["cls"], task["out"], tuple(task["variants"]), tuple(task["layouts"])),
                }
            else:
                result = {"status": "built", **build(task["cls"], task["out"], task["variant"])}
        except NotApplicable as exc:
            result = {"status": "n/a", "reason": str(exc)}
        except ImportError as exc:  # an optional backend (timm, pillow, scipy, ...) is not installed here
            result = {"status": "skipped", "reason": f"missing dependency: {_reason(exc)}"}
        except BaseException as exc:
            result = {"status": "failed", "reason": _reason(exc), "trace": traceback.format_exc(limit=-3)}
            if not _default_config_builds(task["cls"]):
                result["status"] = "skipped"
                result["reason"] = f"its default config does not build in transformers: {result['reason']}"
        result["seconds"] = round(time.monotonic() - start, 2)
        answer.write(json.dumps(result) + "\n")


def _default_config_builds(name: str) -> bool:
    """Whether the class builds (meta device) from its unmodified default config: tells shrinker bugs apart."""
    import torch

    try:
        cls = model_class(name)
        with torch.device("meta"):
            cls(cls.config_class())
    except Exception:
        return False
    return True


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(exc).__name__}: {text}"[:240]


class _Worker:
    """A worker subprocess running ``script _worker`` (this file's, or another sweep's that speaks its protocol)."""

    def __init__(self, log: Path, script: str = __file__) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script), "_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )

    def run(self, task: dict[str, str], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            return {"status": "failed", "reason": f"WorkerDied: {exc}"}
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            return {"status": "failed", "reason": f"Timeout: no result within {timeout:.0f} s", "seconds": timeout}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"status": "failed", "reason": f"WorkerDied: exit code {code}"}
        result: dict[str, Any] = json.loads(line)
        return result

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        if self.alive():
            self.kill()
        self._log.close()


def sweep(
    classes: list[str],
    out_dir: Path,
    variants: tuple[str, ...] = VARIANTS,
    jobs: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """``run_class`` for every class in worker subprocesses (``out_dir/<Class>/<variant>/``); returns {class: record}.

    A record has ``status`` (built, skipped, failed) and, when built, the ``variants`` with their truth.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    local = threading.local()
    log = out_dir / "workers.log"
    workers: list[_Worker] = []

    def run(cls: str) -> None:
        if cls in SKIP:
            result: dict[str, Any] = {"status": "skipped", "reason": SKIP[cls]}
        else:
            worker: _Worker | None = getattr(local, "worker", None)
            if worker is None or not worker.alive():
                worker = local.worker = _Worker(log)
                with lock:
                    workers.append(worker)
            sampled = classes.index(cls) % LAYOUT_SAMPLE_EVERY == 0
            layouts = LAYOUTS if sampled else ("safetensors",)
            payload = {"cls": cls, "out": str(out_dir / cls), "variants": list(variants), "layouts": list(layouts)}
            result = worker.run(payload, timeout)
            if result["status"] == "failed" and not worker.alive():
                local.worker = None
        with lock:
            results[cls] = result
            if progress:
                progress(cls, result)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, classes))
    for worker in workers:
        worker.close()
    return {c: results[c] for c in classes}


# --------------------------------------------------------------------------------------------------------------------
# tieaudit's verdicts against the truth
# --------------------------------------------------------------------------------------------------------------------

ALARM = ("warning", "error")


def audit_all(directories: list[Path], env: dict[str, str] | None = None) -> dict[str, Any]:
    """One ``tieaudit check --format json`` process over every directory (the batch report, parsed)."""
    cmd = [sys.executable, "-m", "tieaudit", "check", "--format", "json", "--no-peft-check", *map(str, directories)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode not in (0, 1, 2) or not proc.stdout.strip():
        raise RuntimeError(f"tieaudit exited {proc.returncode}: {proc.stderr[-2000:]}")
    batch: dict[str, Any] = json.loads(proc.stdout)
    return batch


def _stored_names(directory: Path) -> set[str]:
    import torch
    from safetensors import safe_open

    names: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            names.update(handle.keys())
    for path in directory.glob("*.bin"):
        names.update(torch.load(path, map_location="meta", weights_only=True, mmap=True))
    return names


def reader_claim_holds(finding: dict[str, Any], report: dict[str, Any], directory: Path) -> bool:
    """Whether a warning-level TIE005 reader claim matches the files: a reader said to find no head really finds none
    stored; one said to discard a stored head really has one to discard; the reader serves this architecture."""
    from tieaudit.ties import vllm_registry

    if finding["code"] != "TIE005":
        return False
    head = finding["location"].get("tensor")
    groups = report["graph"]["groups"]
    disk = next((g["disk_names"].get(head, head) for g in groups if head in g["targets"]), head)
    stored = disk in _stored_names(directory)
    architecture = report["target"].get("architecture")
    claims = [r for r in finding["evidence"].get("readers", []) if r["severity"] in ALARM]
    for claim in claims:
        if claim["reader"] == "vllm" and architecture not in vllm_registry.ARCHITECTURES:
            return False
        if claim["value"] is False and stored:  # "finds no head" needs the head absent
            return False
        if claim["value"] is True and not stored:  # "discards the stored head" needs one
            return False
    return bool(claims)


def judge(results: dict[str, dict[str, Any]], out_dir: Path, batch: dict[str, Any]) -> dict[str, Any]:
    """Every built (class, variant) against tieaudit's report: ``caught`` / ``miss`` for checkpoints transformers
    loads wrong (or not at all), ``ok`` / ``false-alarm`` / ``reader-warning`` for checkpoints it loads as saved,
    ``not-audited`` where tieaudit exited 2 on a checkpoint transformers loads. Classes whose tiny clean build does
    not load back are set aside with the reason."""
    reports = {str(Path(r["target"]["path"])): r for r in batch["reports"]}
    errors = {str(Path(e["path"])): e for e in batch["errors"]}
    rows: list[dict[str, Any]] = []
    set_aside: dict[str, str] = {}
    for cls, record in results.items():
        variants = record.get("variants", {})
        clean = variants.get("clean", {})
        if record.get("status") != "built" or clean.get("status") != "built":
            continue
        if clean.get("truth") == "load-error":
            set_aside[cls] = f"its tiny clean save does not load back in transformers: {clean.get('reason', '')}"
            continue
        for variant, entry in variants.items():
            if entry.get("status") != "built":
                continue
            directory = out_dir / cls / variant
            report, error = reports.get(str(directory)), errors.get(str(directory))
            findings = report["findings"] if report else []
            alarms = [f for f in findings if f["severity"] in ALARM]
            if entry["truth"] == "intact":
                if error:
                    outcome = "not-audited"
                elif not alarms:
                    outcome = "ok"
                elif report and all(reader_claim_holds(f, report, directory) for f in alarms):
                    outcome = "reader-warning"
                else:
                    outcome = "false-alarm"
            elif error and entry["truth"] == "load-error":
                outcome = "caught"  # tieaudit refuses the checkpoint too (exit 2, the reason on stderr)
            else:
                outcome = "caught" if any(f["severity"] == "error" for f in findings) else "miss"
            rows.append(
                {
                    "class": cls,
                    "variant": variant,
                    "truth": entry["truth"],
                    "outcome": outcome,
                    "codes": sorted({f"{f['code']}:{f['severity']}" for f in findings}),
                    "error": error["message"] if error else None,
                }
            )
    return {"rows": rows, "set_aside": set_aside}


def verdict_lines(judged: dict[str, Any]) -> list[str]:
    counts: dict[str, dict[str, int]] = {}
    for row in judged["rows"]:
        counts.setdefault(row["variant"], {}).setdefault(row["outcome"], 0)
        counts[row["variant"]][row["outcome"]] += 1
    lines = [f"set aside: {len(judged['set_aside'])} classes"]
    lines += [f"  {cls}: {why}" for cls, why in sorted(judged["set_aside"].items())]
    for variant in sorted(counts, key=_variant_order):
        lines.append(f"  {variant:22} " + ", ".join(f"{k}: {n}" for k, n in sorted(counts[variant].items())))
    for row in judged["rows"]:
        if row["outcome"] in ("miss", "false-alarm", "not-audited", "reader-warning"):
            lines.append(f"  {row['outcome']:14} {row['class']}/{row['variant']} ({row['truth']}): {row['codes']}")
    return lines


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _cmd_list(_: argparse.Namespace) -> int:
    undetermined: list[str] = []
    names = tied_classes(undetermined)
    for name in names:
        print(name)
    print(f"# {len(names)} tie-declaring classes (of {len(auto_classes())} auto-mapped)")
    if undetermined:
        print(f"# {len(undetermined)} untied-on-class classes could not be built to check submodules:")
        print("# " + ", ".join(undetermined))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    start = time.monotonic()
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if args.classes:
        classes = sorted({c.strip() for c in args.classes.split(",") if c.strip()})
    else:
        print("enumerating tie-declaring classes ...", flush=True)
        classes = tied_classes()
        print(f"enumerated {len(classes)} classes in {time.monotonic() - start:.0f} s", flush=True)
    done = [0]

    def progress(cls: str, result: dict[str, Any]) -> None:
        done[0] += 1
        if args.verbose or result["status"] == "failed":
            print(f"[{done[0]}/{len(classes)}] {cls}: {result['status']} {result.get('reason', '')}", flush=True)
        elif done[0] % 25 == 0:
            print(f"[{done[0]}/{len(classes)}] ...", flush=True)

    out_dir = Path(args.out_dir)
    results = sweep(classes, out_dir, variants, args.jobs, args.timeout, progress)
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    print()
    print("\n".join(summary_lines(results)))
    print(f"total time: {time.monotonic() - start:.0f} s  (summary: {out_dir / 'summary.json'})")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def summary_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """Counts a reader of a new transformers release wants: classes by status (with reasons), variants by truth."""
    by_status: dict[str, list[str]] = {}
    for cls, record in results.items():
        by_status.setdefault(record["status"], []).append(cls)
    lines = [f"classes: {len(results)} enumerated, " + ", ".join(f"{len(v)} {k}" for k, v in sorted(by_status.items()))]
    for status in ("failed", "skipped"):
        for cls in by_status.get(status, []):
            lines.append(f"  {status:7} {cls}: {results[cls].get('reason', '')}")
    counts: dict[str, dict[str, int]] = {}
    for record in results.values():
        for variant, entry in record.get("variants", {}).items():
            key = entry.get("truth", entry["status"])
            counts.setdefault(variant, {}).setdefault(key, 0)
            counts[variant][key] += 1
    for variant in sorted(counts, key=_variant_order):
        lines.append(f"  {variant:22} " + ", ".join(f"{k}: {n}" for k, n in sorted(counts[variant].items())))
    return lines


def _variant_order(name: str) -> tuple[int, int]:
    variant, _, layout = name.partition(".")
    return (VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS), LAYOUTS.index(layout or "safetensors"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        _worker_main()
        return 0
    parser = argparse.ArgumentParser(prog="zoo.py", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the tie-declaring classes and their count").set_defaults(func=_cmd_list)
    p_build = sub.add_parser("build", help="build tiny models into OUT_DIR/<Class>/<variant>/")
    p_build.add_argument("out_dir")
    p_build.add_argument("--classes", default="", help="comma-separated class names (default: all tied classes)")
    p_build.add_argument("--jobs", type=int, default=2)
    p_build.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    p_build.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per class and variant")
    p_build.add_argument("-v", "--verbose", action="store_true")
    p_build.set_defaults(func=_cmd_build)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
