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

VARIANTS = ("clean", "untied_missing", "diverged")
DEFAULT_TIMEOUT = 60.0

# Classes that cannot be built tiny at all in this environment, with the reason. Keep this short.
SKIP: dict[str, str] = {}


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
    shrink_lists: bool = True
    keep_layers: bool = False  # leave every layer count (and per-layer list) as the default config has it
    keep_vocab: bool = False  # leave vocab sizes alone (token-id *ranges* can depend on them)


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
    r"^(hidden_size|d_model|n_embd|n_embed|embed_dim|embedding_size|embedding_dim|hidden_dim|model_dim|dim|width"
    r"|word_embed_proj_dim|projection_dim|proj_dim|d_embed)$"
    r"|_hidden_size$|_embed_dim$|_hidden_dim$|_embedding_dim$|_embedding_size$|_proj_dim$|_projection_dim$"
    r"|^adapter_(in|out)_dim$|_(in|out)_hidden_dim$"
)
_HIDDEN_EXCLUDE = re.compile(r"per_layer|frequency|position|bbox|rel|speaker|lang|spkr|pos_|_pos|bin|kernel|ple")
_LIST_HIDDEN = re.compile(r"^(hidden_sizes|embed_dims|neck_hidden_sizes|embed_dim_per_stage|embedding_dimension)$")
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
    if _VOCAB.search(key):
        if plan.keep_vocab:
            return None
        if key == "vocab_size":
            return max(plan.vocab, min_vocab)
        return min(value, plan.vocab) if value > plan.vocab else None
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
        dim = getattr(config, "head_dim", None) or head_dim
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

    Token-id fields are never changed: vocab sizes are raised above the largest token id of the whole config tree.
    ``tie_word_embeddings`` is left as the config has it.
    """
    plan = plan or SHRINK_PLANS[0]
    configs = list(_walk(config))
    max_id = max((i for c in configs for i in _token_ids(c)), default=-1)
    min_vocab = max(plan.vocab, max_id + 1)
    for sub in configs:
        _shrink_one(sub, plan, min_vocab)
    return config


# --------------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------------


def _instantiate(name: str) -> tuple[PreTrainedModel, int]:
    """Build ``name`` tiny on CPU, trying each shrink plan; returns the model and the plan index that worked."""
    import torch

    cls = model_class(name)
    errors: list[BaseException] = []
    for index, plan in enumerate(SHRINK_PLANS):
        try:
            config = shrink(cls.config_class(), plan)
            torch.manual_seed(0)
            with torch.device("cpu"):
                model = cls(config)
            validate = getattr(model.config, "validate", None)
            if callable(validate):
                validate()  # save_pretrained validates strictly: fail here so the next plan gets a chance
        except Exception as exc:
            errors.append(exc)
            continue
        model = model.to(torch.float32).eval()
        return model, index
    raise errors[0]


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


def _apply_variant(model: PreTrainedModel, variant: str) -> dict[str, str]:
    """Mutate ``model`` for ``variant``; returns the tie pairs ({target: source}) the variant acted on."""
    import torch

    pairs: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    if variant == "clean":
        return pairs
    if not pairs:
        raise NotApplicable("no active tie (all_tied_weights_keys is empty)")
    if variant == "untied_missing":
        for config in _governing_configs(model):
            config.tie_word_embeddings = False
        # weights stay shared, so save_pretrained drops the tied targets while the config now says "untied"
        return pairs
    if variant == "diverged":
        generator = torch.Generator().manual_seed(1)
        for target in pairs:
            module_name, _, param_name = target.rpartition(".")
            module = model.get_submodule(module_name)
            old = getattr(module, param_name)
            noise = torch.randn(old.shape, generator=generator, dtype=old.dtype) * 0.02 + 0.01
            setattr(module, param_name, torch.nn.Parameter(old.detach().clone() + noise))
        return pairs
    raise ValueError(f"unknown variant {variant!r}")


class NotApplicable(Exception):
    """The variant does not apply to this class (e.g. nothing is tied under its default config)."""


def build(class_name: str, out_dir: str | os.PathLike[str], variant: str = "clean") -> dict[str, Any]:
    """Build a tiny seeded float32 ``class_name`` on CPU and ``save_pretrained`` it into ``out_dir``.

    Returns a JSON-able record (plan index, parameter count, tie pairs).
    """
    _quiet()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    model, plan_index = _instantiate(class_name)
    pairs = _apply_variant(model, variant)
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
            record = build(task["cls"], task["out"], task["variant"])
            result: dict[str, Any] = {"status": "built", **record}
        except NotApplicable as exc:
            result = {"status": "n/a", "reason": str(exc)}
        except ImportError as exc:  # an optional backend (timm, pillow, scipy, ...) is not installed here
            result = {"status": "skipped", "reason": f"missing dependency: {_reason(exc)}"}
        except BaseException as exc:
            result = {"status": "failed", "reason": _reason(exc), "trace": traceback.format_exc(limit=-3)}
            if not _default_config_builds(task["cls"]):
                result["reason"] = "[default config fails too] " + result["reason"]
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
    def __init__(self, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "_worker"],
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
    variants: tuple[str, ...] = ("clean",),
    jobs: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Build every (class, variant) in worker subprocesses; returns {class: {variant: result}}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(c, v) for c in classes for v in variants]
    results: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in classes}
    lock = threading.Lock()
    local = threading.local()
    log = out_dir / "workers.log"

    def run(task: tuple[str, str]) -> None:
        cls, variant = task
        if cls in SKIP:
            result: dict[str, Any] = {"status": "skipped", "reason": SKIP[cls]}
        else:
            worker: _Worker | None = getattr(local, "worker", None)
            if worker is None or not worker.alive():
                worker = local.worker = _Worker(log)
            payload = {"cls": cls, "out": str(out_dir / cls / variant), "variant": variant}
            result = worker.run(payload, timeout)
            if result["status"] == "failed" and not worker.alive():
                local.worker = None
        with lock:
            results[cls][variant] = result
            if progress:
                progress(cls, variant, result)

    workers: list[_Worker] = []

    def run_tracked(task: tuple[str, str]) -> None:
        run(task)
        worker = getattr(local, "worker", None)
        if worker is not None and worker not in workers:
            with lock:
                workers.append(worker)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run_tracked, tasks))
    for worker in workers:
        worker.close()
    return results


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
        enumerated = len(classes)
    else:
        print("enumerating tie-declaring classes ...", flush=True)
        classes = tied_classes()
        enumerated = len(classes)
        print(f"enumerated {enumerated} classes in {time.monotonic() - start:.0f} s", flush=True)
    done = [0]
    total = len(classes) * len(variants)

    def progress(cls: str, variant: str, result: dict[str, Any]) -> None:
        done[0] += 1
        if args.verbose or result["status"] == "failed":
            extra = result.get("reason", "")
            print(f"[{done[0]}/{total}] {cls}/{variant}: {result['status']} {extra}", flush=True)
        elif done[0] % 25 == 0:
            print(f"[{done[0]}/{total}] ...", flush=True)

    out_dir = Path(args.out_dir)
    results = sweep(classes, out_dir, variants, args.jobs, args.timeout, progress)
    elapsed = time.monotonic() - start
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1, sort_keys=True))

    print()
    print(f"enumerated: {enumerated}")
    for variant in variants:
        by_status: dict[str, list[str]] = {}
        for cls in classes:
            by_status.setdefault(results[cls][variant]["status"], []).append(cls)
        counts = ", ".join(f"{k}: {len(v)}" for k, v in sorted(by_status.items()))
        print(f"[{variant}] {counts}")
        for status in ("failed", "skipped", "n/a"):
            for cls in by_status.get(status, []):
                print(f"  {status:7} {cls}: {results[cls][variant].get('reason', '')}")
    print(f"total time: {elapsed:.0f} s  (summary: {out_dir / 'summary.json'})")
    failed = sum(1 for c in classes for v in variants if results[c][v]["status"] == "failed")
    return 1 if failed else 0


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
    p_build.add_argument("--variants", default="clean", help=f"comma-separated, from {','.join(VARIANTS)}")
    p_build.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per class and variant")
    p_build.add_argument("-v", "--verbose", action="store_true")
    p_build.set_defaults(func=_cmd_build)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
