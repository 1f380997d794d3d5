"""Declared ties: what the model class says is tied, as transformers itself computes it.

The model is built on the meta device from the checkpoint's config (no weights, no memory), and the
tie map is read from transformers (`all_tied_weights_keys`, `get_expanded_tied_weights_keys`), so
names are never hard-coded here: `wte`, `shared`, `proj_out` or `cls.predictions.decoder` come from
the classes themselves. Remote code is never run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tieaudit.checkpoint.config import escape_pointer_token, get_pointer
from tieaudit.checkpoint.types import ConfigFile
from tieaudit.errors import InputError
from tieaudit.ties import cache as tiemap_cache
from tieaudit.ties.cache import NameTable
from tieaudit.ties.readers import READERS, TIE_FLAG, ReaderView
from tieaudit.ties.table import shipped_ties


@dataclass(frozen=True)
class Flag:
    """The config flag that governs a declared tie, as transformers reads it."""

    pointer: str  # JSON pointer in config.json, e.g. "/tie_word_embeddings" or "/text_config/tie_word_embeddings"
    value: bool  # the value transformers uses (after defaults and forced values)
    raw: Any  # the value written in config.json (None when the key is absent)
    forced: bool = False  # the config class ties whatever config.json says (T5Config)

    @property
    def ref(self) -> str:
        return f"config.json:{self.pointer}"


@dataclass(frozen=True)
class DeclaredTies:
    """The declared tie map of one model class under one config."""

    architecture: str
    transformers_version: str
    potential: dict[str, str]  # every declared {target: source}, whatever the flags say
    active: dict[str, str]  # the {target: source} transformers ties with this config
    flags: dict[str, Flag]  # target -> the flag that governs it
    expected: dict[str, tuple[int, ...]]  # in-memory name -> the shape the config builds
    model_keys: frozenset[str]
    rename: Callable[[str], str] = field(repr=False, compare=False)  # on-disk name -> in-memory name
    # in-memory name -> the on-disk name save_pretrained writes (legacy names for some classes)
    to_disk: Callable[[str], str] = field(repr=False, compare=False, default=lambda name: name)
    # in-memory weight names stored [in_features, out_features] (transformers' Conv1D, e.g. GPT-2's attention):
    # peft's LoRA delta on them is transposed (it forces fan_in_fan_out=True for these layers)
    transposed: frozenset[str] = frozenset()
    # in-memory name of the output head's weight (`get_output_embeddings()`), None when the class has none
    head: str | None = None
    readers: tuple[ReaderView, ...] = ()  # where readers other than transformers read the head's tie


class DeclaredTiesUnavailable(Exception):
    """Declared ties could not be computed; the reason goes to the report's `skipped`."""


_cache: dict[tuple[str, str], DeclaredTies] = {}


def validate_flag_types(config: ConfigFile) -> None:
    """Reject tie flags that are not booleans: transformers' readers disagree on what "yes" means."""
    for pointer, value in _iter_flag_values(config.data):
        if not isinstance(value, bool):  # null included: transformers' strict configs refuse it
            line = config.line_of(pointer)
            where = f" (line {line})" if line else ""
            raise InputError(
                f"config.json:{pointer}{where}: expected true or false, got {json.dumps(value)}; "
                "fix the value before auditing"
            )
    archs = config.data.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError("config.json:/architectures: expected a list of class names")


def _iter_flag_values(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    if TIE_FLAG in data:
        yield f"{prefix}/{TIE_FLAG}", data[TIE_FLAG]
    for key, value in data.items():
        if isinstance(value, dict) and TIE_FLAG in value:
            yield f"{prefix}/{escape_pointer_token(key)}/{TIE_FLAG}", value[TIE_FLAG]


def architecture_of(config: ConfigFile) -> str | None:
    archs = config.data.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def declared_ties(root: Path, config: ConfigFile, *, persistent: bool = True) -> DeclaredTies:
    """Build the model class of `config.architectures` on the meta device and read its tie map.

    Raises DeclaredTiesUnavailable with a reason when the class is unknown, is remote code, or
    cannot be built from this config. The shipped table (tieaudit.ties.table) answers first, without transformers,
    where it can vouch for this config and the installed transformers; then results are cached per (architecture,
    config text) in memory and, unless `persistent` is False, on disk (tieaudit.ties.cache), so a repeat audit does
    not import transformers either.
    """
    arch = architecture_of(config)
    key = (arch or "", json.dumps(config.data, sort_keys=True))
    if key in _cache:
        return _cache[key]
    if tiemap_cache.cache_dir() is not None:  # --no-cache: computed with transformers, whatever is shipped
        shipped = shipped_ties(config, arch, lambda: _compute_later(config, arch))
        if shipped is not None:
            _cache[key] = shipped
            return shipped
    version = tiemap_cache.transformers_version() if persistent and tiemap_cache.cache_dir() else None
    disk_key = tiemap_cache.entry_key(arch, config.data, version) if version else None
    if disk_key is not None:
        entry = tiemap_cache.load(disk_key)
        if entry is not None:
            cached = _from_entry(entry, config)
            if cached is not None:
                _cache[key] = cached
                return cached
    try:
        result = _compute(root, config, arch)
    except DeclaredTiesUnavailable as exc:
        if disk_key is not None:
            tiemap_cache.store(disk_key, {"unavailable": str(exc)})
        raise
    if disk_key is not None:
        tiemap_cache.store(disk_key, _to_entry(result))
    _cache[key] = result
    return result


def _compute_later(config: ConfigFile, arch: str | None) -> DeclaredTies:
    """`_compute` for a name a shipped or cached map does not know, asked after the audit may have moved on: from
    the config's own text in a directory of its own (the checkpoint's may be gone: `fix` plans on temporary ones)."""
    with tempfile.TemporaryDirectory(prefix="tieaudit-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config.data), encoding="utf-8")
        return _compute(Path(tmp), config, arch)


def _compute(root: Path, config: ConfigFile, arch: str | None) -> DeclaredTies:
    with quiet_libraries():
        import transformers

        cls = getattr(transformers, arch, None) if arch else None
        if arch and (cls is None or not isinstance(cls, type)):
            remote = (
                " and config.json has an auto_map (remote code, never run by tieaudit)"
                if "auto_map" in config.data
                else ""
            )
            raise DeclaredTiesUnavailable(
                f"architecture {arch} is not a class of transformers {transformers.__version__}{remote}"
            )
        try:
            hf_config = transformers.AutoConfig.from_pretrained(
                str(root), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:  # transformers raises many types for configs it does not understand
            if arch is None:
                raise DeclaredTiesUnavailable(
                    f"config.json names no architecture and transformers cannot read it: {_one_line(exc)}"
                ) from exc
            # the class is a transformers class, so from_pretrained would fail on this config too
            raise InputError(
                f"config.json: transformers {transformers.__version__} cannot read it for {arch}: {_one_line(exc)}"
            ) from exc
        if cls is None:
            cls = _head_class_for(hf_config)
            if cls is None:
                raise DeclaredTiesUnavailable(
                    "config.json names no architecture, and no Auto class with a head knows its model_type"
                )
        return _from_meta_model(cls, hf_config, config, arch or cls.__name__, transformers.__version__)


def _to_entry(d: DeclaredTies) -> dict[str, Any]:
    """A DeclaredTies as JSON, with the on-disk -> in-memory mapping tabulated for every parameter of the model."""
    return {
        "architecture": d.architecture,
        "transformers_version": d.transformers_version,
        "potential": d.potential,
        "active": d.active,
        "flags": {
            t: {"pointer": f.pointer, "value": f.value, "raw": f.raw, "forced": f.forced} for t, f in d.flags.items()
        },
        "expected": {name: list(shape) for name, shape in d.expected.items()},
        "transposed": sorted(d.transposed),
        "head": d.head,
        "readers": [dataclasses.asdict(r) for r in d.readers],
        "rename": {name: d.rename(name) for name in sorted(d.model_keys)},
        # to_disk is asked only for members of tied groups (where an untie stores a new tensor); one transformers
        # call per name rebuilds the whole conversion mapping (~2 ms each: 2 s for a 405B model), so only those
        # are tabulated and any other name falls back to transformers
        "to_disk": {name: d.to_disk(name) for name in sorted({*d.potential, *d.potential.values()})},
    }


def _from_entry(entry: dict[str, Any], config: ConfigFile) -> DeclaredTies | None:
    """The DeclaredTies of a cache entry (None when the entry is malformed: it is then recomputed). An entry that
    recorded an unavailable tie map raises it again."""
    if isinstance(entry.get("unavailable"), str):
        raise DeclaredTiesUnavailable(entry["unavailable"])
    try:
        flags = {
            t: Flag(pointer=str(f["pointer"]), value=bool(f["value"]), raw=f["raw"], forced=bool(f["forced"]))
            for t, f in entry["flags"].items()
        }
        expected = {str(n): tuple(int(x) for x in shape) for n, shape in entry["expected"].items()}
        # the real thing, built at most once, for a name the entry does not know
        fresh = functools.cache(lambda: _compute_later(config, architecture_of(config)))

        return DeclaredTies(
            architecture=str(entry["architecture"]),
            transformers_version=str(entry["transformers_version"]),
            potential={str(k): str(v) for k, v in entry["potential"].items()},
            active={str(k): str(v) for k, v in entry["active"].items()},
            flags=flags,
            expected=expected,
            model_keys=frozenset(expected),
            rename=NameTable(entry["rename"], lambda: fresh().rename),
            to_disk=NameTable(entry["to_disk"], lambda: fresh().to_disk),
            transposed=frozenset(str(n) for n in entry["transposed"]),
            head=None if entry["head"] is None else str(entry["head"]),
            readers=tuple(
                ReaderView(str(r["reader"]), str(r["pointer"]), bool(r["value"]), bool(r["forced"]))
                for r in entry["readers"]
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _head_class_for(hf_config: Any) -> type | None:
    """Without `architectures`, the class the Auto classes would pick for this model_type, heads first
    (a user loads such a checkpoint with AutoModelForCausalLM and friends)."""
    import transformers

    autos = (
        "AutoModelForCausalLM",
        "AutoModelForSeq2SeqLM",
        "AutoModelForSpeechSeq2Seq",
        "AutoModelForImageTextToText",
        "AutoModelForMaskedLM",
        "AutoModel",
    )
    for name in autos:
        auto = getattr(transformers, name, None)
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is None:
            continue
        try:
            found = mapping[type(hf_config)]
        except (KeyError, ValueError):
            continue
        if isinstance(found, (list, tuple)):
            found = found[0]
        if isinstance(found, type):
            return found
    return None


def _from_meta_model(cls: type, hf_config: Any, config: ConfigFile, arch: str, version: str) -> DeclaredTies:
    import torch

    try:
        with torch.device("meta"):
            model = cls(hf_config)
    except Exception as exc:
        raise DeclaredTiesUnavailable(f"cannot build {arch} from this config.json: {_one_line(exc)}") from exc
    return ties_of_model(model, config, arch=arch, version=version, active=None)


def ties_of_model(
    model: Any, config: ConfigFile, *, arch: str, version: str, active: dict[str, str] | None
) -> DeclaredTies:
    """Read the declared ties of a built model (meta or live). `active` defaults to what the model was built with."""
    hf_config = model.config
    if active is None:
        active = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    potential: dict[str, str] = {}
    flags: dict[str, Flag] = {}
    for target, source, sub in _declared_pairs(model):
        potential.setdefault(target, source)
        flags.setdefault(target, _flag_for(sub.config, hf_config, config))

    state = model.state_dict()
    expected = {name: tuple(t.shape) for name, t in state.items()}
    rename = _renamer(model, state)
    to_disk = _reverse_renamer(model)
    from transformers.pytorch_utils import Conv1D

    transposed = frozenset(
        f"{name}.weight" if name else "weight" for name, sub in model.named_modules() if isinstance(sub, Conv1D)
    )
    return DeclaredTies(
        architecture=arch,
        transformers_version=version,
        potential=potential,
        active=active,
        flags=flags,
        expected=expected,
        model_keys=frozenset(state),
        rename=rename,
        to_disk=to_disk,
        transposed=transposed,
        head=_head_weight(model),
        readers=reader_flags(model, hf_config, config),
    )


def _head_weight(model: Any) -> str | None:
    """The in-memory name of the output head's weight, as `get_output_embeddings()` answers it."""
    try:
        head = model.get_output_embeddings()
    except Exception:  # some classes raise instead of returning None
        return None
    if getattr(head, "weight", None) is None:
        return None
    for name, module in model.named_modules(remove_duplicate=False):
        if module is head:  # by module: a tied head's weight *is* the embedding's Parameter
            return f"{name}.weight" if name else "weight"
    return None


def reader_flags(model: Any, hf_config: Any, config: ConfigFile) -> tuple[ReaderView, ...]:
    """Where each modelled reader (tieaudit.ties.readers) reads the flag of the output head's tie, from its own rule."""

    out = []
    for name, reader in READERS.items():
        sub, forced = reader.flag_config(model, hf_config)
        pointer = config_pointer(hf_config, sub) if sub is not None else None
        if pointer is None:
            continue
        value = forced if forced is not None else bool(getattr(sub, TIE_FLAG, False))
        out.append(ReaderView(reader=name, pointer=pointer, value=value, forced=forced is not None))
    return tuple(out)


def config_pointer(top: Any, target: Any) -> str | None:
    """The JSON pointer of `target`'s tie flag in config.json, `target` being `top` or a config nested in it."""
    from transformers import PretrainedConfig

    todo: list[tuple[Any, str]] = [(top, "")]
    seen: set[int] = set()
    while todo:
        cfg, prefix = todo.pop(0)
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        if cfg is target:
            return f"{prefix}/{TIE_FLAG}"
        for key, value in vars(cfg).items():
            if isinstance(value, PretrainedConfig):
                todo.append((value, f"{prefix}/{escape_pointer_token(key)}"))
    return None


def _declared_pairs(model: Any) -> Iterator[tuple[str, str, Any]]:
    """(target, source, declaring sub-model) for every tie any (sub-)model declares, whatever the flags say."""
    from transformers.modeling_utils import PreTrainedModel

    for prefix, sub in model.named_modules(remove_duplicate=False):
        if not isinstance(sub, PreTrainedModel) or not getattr(sub, "_tied_weights_keys", None):
            continue
        for target, source in _expanded_with_tie_forced(sub).items():
            yield (f"{prefix}.{target}" if prefix else target), (f"{prefix}.{source}" if prefix else source), sub


def class_ties(architecture: str) -> dict[str, str]:
    """Every {target: source} a transformers class declares, built from its default config on the meta device
    (what an adapter alone can be judged against when its base is not at hand). Raises DeclaredTiesUnavailable."""
    with quiet_libraries():
        import torch
        import transformers

        cls = getattr(transformers, architecture, None)
        if not isinstance(cls, type) or not hasattr(cls, "config_class"):
            raise DeclaredTiesUnavailable(f"{architecture} is not a class of transformers {transformers.__version__}")
        try:
            with torch.device("meta"):
                model = cls(cls.config_class())
        except Exception as exc:
            raise DeclaredTiesUnavailable(
                f"cannot build {architecture} from its default config: {_one_line(exc)}"
            ) from exc
        return {target: source for target, source, _ in _declared_pairs(model)}


def _expanded_with_tie_forced(sub: Any) -> dict[str, str]:
    """The sub-model's declared ties whatever its flag says (transformers returns {} when the flag is off)."""
    cfg = sub.config
    had = hasattr(cfg, TIE_FLAG)
    old = getattr(cfg, TIE_FLAG, None)
    try:
        setattr(cfg, TIE_FLAG, True)
        return dict(sub.get_expanded_tied_weights_keys(all_submodels=False))
    finally:
        if had:
            setattr(cfg, TIE_FLAG, old)
        else:
            with contextlib.suppress(AttributeError):
                delattr(cfg, TIE_FLAG)


def _flag_for(sub_config: Any, top_config: Any, config: ConfigFile) -> Flag:
    """Which key of config.json governs a sub-model's ties: the flag of the config object it holds, at any depth
    (`config_pointer`, the one answer to "where is this config's flag"); the top level for a config that is not
    reachable from the top (built by the model itself)."""
    pointer = config_pointer(top_config, sub_config) or f"/{TIE_FLAG}"
    raw = get_pointer(config.data, pointer)
    value = bool(getattr(sub_config, TIE_FLAG, False))
    return Flag(pointer=pointer, value=value, raw=raw, forced=value and _forces_tie(type(sub_config)))


def _forces_tie(config_class: type) -> bool:
    """Whether a config class ties even when told not to (T5Config sets the flag to true in __post_init__)."""
    try:
        return bool(getattr(config_class(**{TIE_FLAG: False}), TIE_FLAG, False))
    except Exception:  # a config class that cannot be built from defaults: assume it obeys the flag
        return False


def _renamer(model: Any, meta_state: dict[str, Any]) -> Callable[[str], str]:
    """On-disk name -> in-memory name, with transformers' own conversion mapping (legacy names, prefixes)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except Exception:  # an older or newer transformers without this machinery: names are used as they are
        return lambda name: name
    prefix = model.base_model_prefix

    def rename(name: str) -> str:
        try:
            renamed, _ = rename_source_key(name, renamings, converters, prefix, meta_state)
            if renamed not in meta_state and name in meta_state:
                renamed, _ = rename_source_key(name, [], [], base_model_prefix=prefix, meta_state_dict=meta_state)
        except Exception:
            return name
        return str(renamed)

    return rename


def _reverse_renamer(model: Any) -> Callable[[str], str]:
    """In-memory name -> the name save_pretrained writes, with transformers' own reverse conversion."""
    try:
        import torch
        from transformers.core_model_loading import revert_weight_conversion
    except Exception:  # no conversion machinery: names are written as they are
        return lambda name: name

    def to_disk(name: str) -> str:
        try:
            out = revert_weight_conversion(model, {name: torch.empty(0, device="meta")})
        except Exception:
            return name
        return str(next(iter(out))) if len(out) == 1 else name

    return to_disk


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers and peft log, warn and draw progress bars while building configs and models; none of it
    is ours to show (stdout is the report, stderr is ours)."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in ("transformers", "peft")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__
