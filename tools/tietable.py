"""Generate the shipped tie table (``tieaudit/ties/tietable.json``): the declared tie map of every tie-declaring class
of the locked transformers, as a function of the few config.json values it depends on, so a first audit on a fresh
machine answers without importing torch or transformers (``tieaudit/ties/table.py`` reads it).

    python tools/tietable.py [--zoo DIR] [--jobs N] [--classes A,B]

The input is the zoo (``tools/zoo.py``): one tiny ``config.json`` per class, the ``clean`` save of the sweep (built
first when ``--zoo`` has none). Everything below is measured with tieaudit's own computed path
(``tieaudit.ties.declared._compute``: transformers' ``AutoConfig`` and the class on the meta device), never guessed:

- **flags**: every JSON pointer where transformers or a modelled reader reads ``tie_word_embeddings``; the map is
  recomputed for each combination of true / false / absent at those pointers, and the table holds each answer
  (active ties, flag values, reader values);
- **what else matters**: the class is built once with a spy on its config objects; every bool setting, and every
  int setting it reads, is changed (doubled, +1, -1, or flipped) and the map recomputed. A setting that changes
  anything but the
  sizes of tied tensors is recorded with its value (``must_equal``: another value falls back to the computed path),
  one whose change the tied tensors' sizes follow exactly becomes a size formula, the others are free. A setting
  read but absent from the config (``getattr`` with a default) must stay absent;
- **lists** of words or numbers the build reads (per-layer types) are tried with every entry set to each value the
  list or the class's default holds; one that changes anything must keep its value;
- **names**: the map must name the same tensors whatever the sizes (else the class is not shipped), and
  transformers' on-disk -> in-memory renaming must be the identity on the model's own names (checked on every
  parameter; names are matched with their layer numbers replaced);
- **sources**: the sha256 of every transformers source file the answer came from (the classes' modules, the config
  classes' modules, and the core tie/rename code). A different installed transformers with the same files gets the
  table; any difference falls back to the computed path.

Classes that fail any check are listed under ``unshipped`` with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from tieaudit.ties.table import flat_pointers, is_flag, template  # noqa: E402  (the runtime's own matching)

OUT = ROOT / "tieaudit" / "ties" / "tietable.json"
FORMAT = 1
MAX_FLAG_POINTERS = 4  # 81 combinations
TIE_FLAG = "tie_word_embeddings"
CORE_SOURCES = (  # transformers' own tie, config and renaming code, whatever the class
    "modeling_utils.py",
    "configuration_utils.py",
    "conversion_mapping.py",
    "core_model_loading.py",
    "pytorch_utils.py",
    "models/auto/configuration_auto.py",
)


# --------------------------------------------------------------------------------------------------------------------
# One class (runs in a worker process)
# --------------------------------------------------------------------------------------------------------------------


class Unshippable(Exception):
    pass


def _flat(data: Any) -> dict[str, Any]:
    return dict(flat_pointers(data))


def _with(data: dict[str, Any], pointer: str, value: Any) -> dict[str, Any] | None:
    """``data`` with ``pointer`` set (None: removed); None when the parent object does not exist."""
    from tieaudit.checkpoint.config import pointer_parts

    out = copy.deepcopy(data)
    parts = pointer_parts(pointer)
    node: Any = out
    for part in parts[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return None if value is not None else out
        node = node[part]
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return out


class Computer:
    """tieaudit's computed path on a config dict, with the config settings the model build read."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tietable-"))

    def ties(self, data: dict[str, Any], spy: set[str] | None = None) -> Any:
        from transformers import PretrainedConfig

        from tieaudit.checkpoint.config import read_config
        from tieaudit.ties import declared

        (self.tmp / "config.json").write_text(json.dumps(data))
        config = read_config(self.tmp, "config.json")
        original = PretrainedConfig.__getattribute__
        build = declared._from_meta_model

        def spied_build(*args: Any, **kwargs: Any) -> Any:
            def look(obj: Any, key: str) -> Any:
                if not key.startswith("__") and spy is not None:
                    spy.add(key)
                return original(obj, key)

            PretrainedConfig.__getattribute__ = look  # type: ignore[method-assign]
            try:
                return build(*args, **kwargs)
            finally:
                PretrainedConfig.__getattribute__ = original  # type: ignore[method-assign]

        declared._from_meta_model = spied_build
        try:
            with declared.quiet_libraries():
                return declared._compute(self.tmp, config, declared.architecture_of(config))
        finally:
            declared._from_meta_model = build

    def loaded_value(self, data: dict[str, Any], pointer: str) -> Any:
        """The value transformers' config parsing gives ``pointer`` (its default when absent from ``data``)."""
        import transformers

        from tieaudit.checkpoint.config import pointer_parts

        (self.tmp / "config.json").write_text(json.dumps(data))
        cfg: Any = transformers.AutoConfig.from_pretrained(str(self.tmp), local_files_only=True)
        for part in pointer_parts(pointer):
            cfg = getattr(cfg, part, None) if not isinstance(cfg, dict) else cfg.get(part)
        return cfg


def _structure(d: Any) -> dict[str, Any]:
    """Everything of a DeclaredTies that must not depend on sizes (flag values and active ties aside)."""
    members = sorted({*d.potential, *d.potential.values()})
    return {
        "potential": d.potential,
        "pointers": {t: f.pointer for t, f in d.flags.items()},
        "forced": {t: f.forced for t, f in d.flags.items()},
        "head": d.head,
        "readers": [(r.reader, r.pointer, r.forced) for r in d.readers],
        "to_disk": {m: d.to_disk(m) for m in members},
        "transposed": sorted({template(n) for n in d.transposed}),
        "ranks": {m: len(d.expected[m]) for m in members if m in d.expected},
    }


def _answer(d: Any) -> dict[str, Any]:
    """What depends on the flags: active ties, the flag values transformers uses, the readers' values."""
    return {
        "active": d.active,
        "values": {t: f.value for t, f in d.flags.items()},
        "readers": [r.value for r in d.readers],
    }


def _variants(data: dict[str, Any], pointer: str, value: Any, candidate: Any) -> list[dict[str, Any]]:
    """``data`` with ``pointer`` set to ``candidate``; then also with the lists beside it that had one entry per unit
    of the old value (``layer_types`` for ``num_hidden_layers``) resized to the new one, as a config with that many
    units would have them (entries repeated in turn)."""
    from tieaudit.checkpoint.config import pointer_parts

    edited = _with(data, pointer, candidate)
    assert edited is not None
    out = [edited]
    if isinstance(value, bool) or not isinstance(candidate, int) or value <= 0:
        return out
    parent: Any = edited
    for part in pointer_parts(pointer)[:-1]:
        parent = parent[part]
    resized = copy.deepcopy(edited)
    node: Any = resized
    for part in pointer_parts(pointer)[:-1]:
        node = node[part]
    changed = False
    for key, items in parent.items():
        if isinstance(items, list) and len(items) == value and items:
            node[key] = [items[i % len(items)] for i in range(candidate)]
            changed = True
    if changed:
        out.append(resized)
    return out


def _members(d: Any) -> list[str]:
    return sorted({*d.potential, *d.potential.values()})


def _candidates(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    assert isinstance(value, int)
    out = [value * 2 if value > 0 else value + 2, value + 1, value - 1, value + 3]
    return [v for v in dict.fromkeys(out) if v >= 0 and v != value]


def describe(config_path: Path) -> dict[str, Any]:
    """The table entry of the class whose tiny config is at ``config_path``."""
    computer = Computer()
    data = json.loads(config_path.read_text())
    read: set[str] = set()
    base = computer.ties(data, spy=read)
    if not base.potential:
        raise Unshippable("declares no ties under this config")
    if not _renames_nothing(base):
        raise Unshippable("transformers renames some of the model's own parameter names")
    templates = {template(n) for n in base.model_keys}
    structure = _structure(base)
    members = _members(base)
    flat = _flat(data)

    # -- the flags: every combination of true / false / absent at every pointer read ----------------------------------
    # every place a tie flag can be read from: the governing ones, the readers', the top level, and every copy the
    # config holds (a composite config may pass its top-level flag down to a sub-config when it loads)
    held = {p for p in flat if is_flag(p)}
    pointers = sorted({f.pointer for f in base.flags.values()} | {r.pointer for r in base.readers} | held)
    pointers = sorted({*pointers, f"/{TIE_FLAG}"})
    if len(pointers) > MAX_FLAG_POINTERS:
        raise Unshippable(f"{len(pointers)} flag pointers")
    combos: dict[str, Any] = {}
    for values in itertools.product((True, False, None), repeat=len(pointers)):
        edited: dict[str, Any] | None = data
        for pointer, value in zip(pointers, values, strict=True):
            edited = _with(edited, pointer, value) if edited is not None else None
        if edited is None:
            continue  # a sub-config that is not there cannot hold a value
        try:
            d = computer.ties(edited)
        except Exception:
            continue  # transformers refuses this combination: the runtime falls back for it
        if _structure(d) != structure:
            raise Unshippable("the tied tensors' names or flags change with the flag values")
        if any(d.expected.get(m) != base.expected.get(m) for m in members):
            raise Unshippable("the tied tensors' sizes change with the flag values")
        combos[json.dumps(list(values))] = _answer(d)

    # -- every other int / bool setting the build read ----------------------------------------------------------------
    must_equal: dict[str, Any] = {}
    formulas: dict[str, list[Any]] = {m: list(base.expected.get(m, ())) for m in members}
    formula_of: dict[tuple[str, int], str] = {}
    for pointer, value in flat.items():
        name = pointer.rsplit("/", 1)[-1]
        if pointer in pointers or not isinstance(value, (int, bool)):
            continue
        if name not in read and not isinstance(value, bool):  # every bool is varied: a config may derive others
            continue
        outcome = None
        for candidate in _candidates(value):
            for edited in _variants(data, pointer, value, candidate):
                try:
                    d = computer.ties(edited)
                except Exception:
                    continue
                outcome = (candidate, d)
                break
            if outcome is not None:
                break
        if outcome is None:
            must_equal[pointer] = value  # no other value builds: only this one is known
            continue
        candidate, d = outcome
        if _structure(d) != structure or _answer(d) != _answer(base) or not _renames_nothing(d):
            must_equal[pointer] = value
            continue
        templates |= {template(n) for n in d.model_keys}  # e.g. biases a setting adds: names of this class too
        for m in members:
            old, new = base.expected.get(m), d.expected.get(m)
            if old is None or new is None:
                continue
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                if a == b:
                    continue
                if b == candidate and a == value and (m, i) not in formula_of:
                    formula_of[(m, i)] = pointer
                else:
                    must_equal[pointer] = value
    # lists of words or numbers the build reads (per-layer types, ...): each is tried with every entry set to each
    # value it or the class's default config holds; one that changes anything must keep its value
    default_flat = _flat(_default_config(data))
    for pointer, value in flat.items():
        name = pointer.rsplit("/", 1)[-1]
        if pointer in must_equal or name not in read or not _plain_list(value):
            continue
        default = default_flat.get(pointer)
        pool = list(dict.fromkeys([*value, *(default if _plain_list(default) else [])]))
        for item in pool:
            edited = _with(data, pointer, [item] * len(value))
            assert edited is not None
            try:
                d = computer.ties(edited)
            except Exception:
                continue
            same_sizes = all(d.expected.get(m) == base.expected.get(m) for m in members)
            if _structure(d) != structure or _answer(d) != _answer(base) or not same_sizes:
                must_equal[pointer] = value
                break
    for (m, i), pointer in formula_of.items():
        if pointer not in must_equal:
            formulas[m][i] = pointer
    # settings the build read that config.json does not hold: an int or bool one must keep the value it had here
    # (its default); others (methods, dicts, strings) are taken not to change which tensors exist or tie
    absent = _absent_scalars(computer, data, read, flat)

    # -- defaults: the value transformers reads for a pointer absent from config.json ---------------------------------
    defaults = {}
    for pointer in sorted({*must_equal, *formula_of.values()}):
        removed = _with(data, pointer, None)
        assert removed is not None
        try:
            defaults[pointer] = computer.loaded_value(removed, pointer)
        except Exception:
            defaults[pointer] = None
    defaults = {p: v for p, v in defaults.items() if isinstance(v, (int, bool, str, float)) or v is None}

    return {
        "model_type": data.get("model_type"),
        "transformers_version": base.transformers_version,
        "structure": structure,
        "templates": sorted(templates),
        "pointers": pointers,
        "combos": combos,
        "must_equal": must_equal,
        "absent": absent,
        "defaults": defaults,
        "expected": formulas,
        "sources": _sources(base.architecture),
    }


def _plain_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, (str, int, float, bool)) for x in value)


def _default_config(data: dict[str, Any]) -> dict[str, Any]:
    """The class's default config as a dict (empty when it does not build)."""
    import transformers

    try:
        cls = getattr(transformers, data["architectures"][0])
        out: dict[str, Any] = cls.config_class().to_dict()
    except Exception:
        return {}
    return out


def _renames_nothing(d: Any) -> bool:
    return all(d.rename(k) == k for k in d.model_keys)


def _absent_scalars(computer: Computer, data: dict[str, Any], read: set[str], flat: dict[str, Any]) -> dict[str, Any]:
    """{name: value} of the int and bool settings the build read that ``data`` does not hold, as the config object
    has them (any depth)."""
    import transformers

    present = {p.rsplit("/", 1)[-1] for p in flat}
    (computer.tmp / "config.json").write_text(json.dumps(data))
    config = transformers.AutoConfig.from_pretrained(str(computer.tmp), local_files_only=True)
    found: dict[str, Any] = {}
    todo = [config]
    seen: set[int] = set()
    while todo:
        cfg = todo.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if isinstance(value, transformers.PretrainedConfig):
                todo.append(value)
            elif key in read and key not in present and isinstance(value, (int, bool)) and not key.startswith("_"):
                found.setdefault(key, value)
    return dict(sorted(found.items()))


def _sources(architecture: str) -> list[str]:
    """transformers source files (relative to its package) that the class's tie map came from."""
    import inspect

    import torch
    import transformers

    root = Path(transformers.__file__).parent
    cls = getattr(transformers, architecture)
    files = {*CORE_SOURCES}
    config = cls.config_class()
    configs = [config, *[v for v in vars(config).values() if isinstance(v, transformers.PretrainedConfig)]]
    with torch.device("meta"), contextlib.suppress(Exception):
        model = cls(config)
        for module in model.modules():
            configs.append(getattr(module, "config", None))
            for klass in type(module).__mro__:
                if klass.__module__.startswith("transformers."):
                    files.add(_rel(inspect.getsourcefile(klass), root))
    for c in configs:
        if c is not None:
            for klass in type(c).__mro__:
                if klass.__module__.startswith("transformers."):
                    files.add(_rel(inspect.getsourcefile(klass), root))
    return sorted(f for f in files if f)


def _rel(path: str | None, root: Path) -> str:
    if not path:
        return ""
    with contextlib.suppress(ValueError):
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    return ""


def _worker() -> None:
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    for line in sys.stdin:
        task = json.loads(line)
        start = time.monotonic()
        try:
            result: dict[str, Any] = {"entry": describe(Path(task["config"]))}
        except Unshippable as exc:
            result = {"unshipped": str(exc)}
        except Exception as exc:
            result = {"unshipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
        result["seconds"] = round(time.monotonic() - start, 2)
        answer.write(json.dumps(result) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# The whole table
# --------------------------------------------------------------------------------------------------------------------


def generate(zoo_dir: Path, jobs: int, classes: list[str] | None) -> dict[str, Any]:
    import zoo
    from transformers import __version__ as tf_version

    configs = {
        d.name: d / "clean" / "config.json"
        for d in sorted(zoo_dir.iterdir())
        if (d / "clean" / "config.json").is_file() and (classes is None or d.name in classes)
    }
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    local = threading.local()
    workers: list[zoo._Worker] = []
    log = zoo_dir / "tietable-workers.log"

    def run(name: str) -> None:
        worker = getattr(local, "worker", None)
        if worker is None or not worker.alive():
            worker = local.worker = zoo._Worker(log, script=__file__)
            with lock:
                workers.append(worker)
        result = worker.run({"config": str(configs[name])}, 900)
        if "status" in result:  # the worker died or timed out
            result = {"unshipped": result.get("reason", "worker failed")}
            local.worker = None
        with lock:
            results[name] = result
            done = len(results)
        mark = "ok" if "entry" in result else f"-- {result['unshipped']}"
        print(f"[{done}/{len(configs)}] {name}: {mark} ({result.get('seconds', 0)} s)", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, configs))
    for w in workers:
        w.close()
    entries = {n: r["entry"] for n, r in sorted(results.items()) if "entry" in r}
    files = sorted({f for e in entries.values() for f in e["sources"]})
    hashes = {f: _sha256(f) for f in files}
    return {
        "format": FORMAT,
        "transformers": tf_version,
        "generated_by": "python tools/tietable.py",
        "sources": hashes,
        "classes": entries,
        "unshipped": {n: r["unshipped"] for n, r in sorted(results.items()) if "entry" not in r},
    }


def verify_at_defaults(table: dict[str, Any]) -> dict[str, str]:
    """Hold every entry to transformers at a second point: the class's own default (full-size) config, written as
    `save_pretrained` writes it, with the flags as measured. {class: why} for entries whose answer there differs from
    the computed map (they are then not shipped): a setting whose JSON value is not what the model reads, a size
    the zoo's config could not tell apart from another."""
    import transformers

    from tieaudit.checkpoint.config import read_config
    from tieaudit.ties import declared
    from tieaudit.ties import table as runtime

    runtime._table.cache_clear()
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, declared.quiet_libraries():
        root = Path(tmp)
        for name, entry in table["classes"].items():
            try:
                cls = getattr(transformers, name)
                cls.config_class().save_pretrained(root)
                data = json.loads((root / "config.json").read_text())
            except Exception:
                continue
            data["architectures"] = [name]
            for combo in entry["combos"]:
                edited: dict[str, Any] | None = data
                for pointer, value in zip(entry["pointers"], json.loads(combo), strict=True):
                    edited = _with(edited, pointer, value) if edited is not None else None
                if edited is None:
                    continue
                (root / "config.json").write_text(json.dumps(edited))
                config = read_config(root, "config.json")
                try:
                    computed = declared._compute(root, config, name)
                except Exception:
                    continue
                with _table_as(runtime, table):
                    shipped = runtime.shipped_ties(config, name, lambda c=computed: c)
                if shipped is None:
                    continue
                members = {*computed.potential, *computed.potential.values()}
                same = (
                    shipped.potential == computed.potential
                    and shipped.active == computed.active
                    and shipped.flags == computed.flags
                    and shipped.head == computed.head
                    and shipped.readers == computed.readers
                    and shipped.expected == {m: computed.expected[m] for m in members if m in computed.expected}
                )
                if not same:
                    failures[name] = "at the class's default config the answer differs from transformers'"
                    break
    return failures


@contextlib.contextmanager
def _table_as(runtime: Any, table: dict[str, Any]) -> Any:
    original = runtime._table
    runtime._table = lambda: table
    try:
        yield
    finally:
        runtime._table = original


def _sha256(rel: str) -> str:
    import transformers

    path = Path(transformers.__file__).parent / rel
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _drop(table: dict[str, Any], failures: dict[str, str]) -> None:
    for name, why in failures.items():
        table["classes"].pop(name, None)
        table["unshipped"][name] = why
        print(f"{name}: not shipped: {why}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None, help="the zoo directory (default: the test suite's cache)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--classes", default=None, help="comma-separated class names (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--verify-only", action="store_true", help="only re-run the check at default configs")
    args = parser.parse_args(argv)
    if args.verify_only:
        table = json.loads(args.out.read_text())
        _drop(table, verify_at_defaults(table))
        args.out.write_text(json.dumps(table, separators=(",", ":")) + "\n")
        print(f"{len(table['classes'])} classes shipped, {len(table['unshipped'])} not -> {args.out}")
        return 0
    if args.zoo is None:
        import zoo

        args.zoo = zoo.default_dir()  # the test suite's zoo for the installed versions
    if not any(args.zoo.glob("*/clean/config.json")):
        print(f"no zoo at {args.zoo}: building it first (python tools/zoo.py build {args.zoo})", flush=True)
        import zoo

        zoo.sweep(zoo.tied_classes(), args.zoo, variants=("clean",), jobs=args.jobs)
    classes = args.classes.split(",") if args.classes else None
    start = time.monotonic()
    table = generate(args.zoo, args.jobs, classes)
    if classes is not None and args.out.exists():  # a partial run updates the classes it ran
        old = json.loads(args.out.read_text())
        old["classes"].update(table["classes"])
        for name in table["classes"]:
            old["unshipped"].pop(name, None)
        old["unshipped"].update(table["unshipped"])
        old["sources"].update(table["sources"])
        table = old
    _drop(table, verify_at_defaults(table))
    # key order kept: tie maps are ordered as transformers lists them, and reports follow that order
    args.out.write_text(json.dumps(table, separators=(",", ":")) + "\n")
    print(
        f"{len(table['classes'])} classes shipped, {len(table['unshipped'])} not, "
        f"{len(table['sources'])} source files; {time.monotonic() - start:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["_worker"]:
        _worker()
    else:
        sys.exit(main())
