"""Generate the shipped peft table (``tieaudit/adapter/pefttable.json``): for every tie-declaring class of the zoo and
every adapter shape below, whether tieaudit's forecast of what peft does to the tied layers is what peft does, so a
default ``check ADAPTER`` on a recorded shape needs neither peft nor torch (``tieaudit/adapter/peft_table.py``).

    python tools/pefttable.py [--zoo DIR] [--jobs N] [--classes A,B]

For each class, the zoo's tied save (``tied_clean``, else ``clean``) is loaded with transformers, and for each case
a real peft adapter is made with ``get_peft_model`` on the class's input embedding and output embedding (a class
without an output embedding gets the cases on its input embedding alone; named by
their leaf name when no other module shares it, else by their full path), every adapter tensor set to seeded noise
(`fixtures.adapter_builders.randomize`), and written by ``save_pretrained`` (with peft's default embedding copies and
without them). Each is then checked exactly as ``tieaudit check`` checks it with the shipped peft table switched off:
peft is run on the tied layers (``tieaudit.adapter.oracle``) and compared with the forecast
(``tieaudit.adapter.confirm``). The table records, per class and group signature (``peft_table.signature``), whether
they agreed; a signature measured twice with different outcomes is recorded as disagreeing. The cases:

- LoRA on the embedding, on the head, on both; on the embedding and on both with ``ensure_weight_tying``;
- ``modules_to_save`` on the embedding, on the head, on both; on the embedding with ``ensure_weight_tying``;
- trainable tokens, with and without ``ensure_weight_tying``; LoRA on the embedding with rsLoRA;

each with no task type and, for a class an auto mapping lists as a causal or sequence-to-sequence LM, that task type.
The config keys every adapter had outside the signature (peft's defaults) are recorded; at run time another value
falls back to running peft. The installed peft's version and the sha256 of its sources are recorded with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from tieaudit.adapter import peft_table  # noqa: E402  (the runtime's own signature and source hash)

OUT = peft_table.TABLE
CASES: dict[str, dict[str, Any]] = {
    "lora_embed": {"lora": ["embed"]},
    "lora_head": {"lora": ["head"]},
    "lora_both": {"lora": ["embed", "head"]},
    "lora_embed_tying": {"lora": ["embed"], "ensure_weight_tying": True},
    "lora_both_tying": {"lora": ["embed", "head"], "ensure_weight_tying": True},
    "mts_embed": {"modules_to_save": ["embed"]},
    "mts_head": {"modules_to_save": ["head"]},
    "mts_both": {"modules_to_save": ["embed", "head"]},
    "mts_embed_tying": {"modules_to_save": ["embed"], "ensure_weight_tying": True},
    "tokens": {"tokens": True},
    "tokens_tying": {"tokens": True, "ensure_weight_tying": True},
    "lora_embed_rslora": {"lora": ["embed"], "use_rslora": True},
}
TOKEN_IDS = (1, 5, 9)


# --------------------------------------------------------------------------------------------------------------------
# One class (in a worker subprocess)
# --------------------------------------------------------------------------------------------------------------------


def _tied_dir(class_dir: Path) -> Path | None:
    for variant in ("tied_clean", "clean"):
        d = class_dir / variant
        if (d / "config.json").is_file():
            return d
    return None


def _task_types(name: str) -> list[str | None]:
    from transformers.models.auto import modeling_auto as auto

    out: list[str | None] = [None]
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        out.append("CAUSAL_LM")
    if name in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values():
        out.append("SEQ_2_SEQ_LM")
    return out


def _literal(model: Any, module_name: str) -> str:
    """How a config names the module: its leaf name when no other module's name ends with it, else its path."""
    leaf = module_name.rpartition(".")[2]
    hits = [n for n, _ in model.named_modules() if n == leaf or n.endswith(f".{leaf}")]
    return leaf if hits == [module_name] else module_name


def _other_layer(model: Any, tied: set[int]) -> str:
    """The full name of the first Linear (or transformers Conv1D) layer outside the tied modules ("" if none)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for n, m in model.named_modules():
        if isinstance(m, nn.Linear | Conv1D) and id(m) not in tied and not any(id(p) in tied for p in m.children()):
            return str(n)
    return ""


def _config(case: dict[str, Any], names: dict[str, str], task_type: str | None) -> Any:
    from peft import LoraConfig

    kw: dict[str, Any] = {"r": 4, "lora_alpha": 8, "task_type": task_type}
    # a layer outside the tied group is adapted too, as in a real adapter (and peft wants one target)
    kw["target_modules"] = [names[k] for k in case.get("lora", [])] + ([names["other"]] if names["other"] else [])
    if case.get("modules_to_save"):
        kw["modules_to_save"] = [names[k] for k in case["modules_to_save"]]
    if case.get("tokens"):
        kw["trainable_token_indices"] = list(TOKEN_IDS)
    for key in ("ensure_weight_tying", "use_rslora"):
        if case.get(key):
            kw[key] = True
    return LoraConfig(**kw)


def _names(model: Any) -> dict[str, str]:
    """How a config names the class's input embedding ("embed"), output embedding ("head", absent when the class has
    none: a base model ties its embeddings among themselves) and one other layer ("other")."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if emb is None:
        raise LookupError("no input embedding module to adapt")
    if head is not None and not hasattr(head, "weight"):
        head = None
    modules = {id(m): n for n, m in model.named_modules()}
    names = {"embed": _literal(model, modules[id(emb)])}
    if head is not None:
        names["head"] = _literal(model, modules[id(head)])
    names["other"] = _other_layer(model, {id(emb), id(head)})
    return names


def names_of(name: str, base_dir: Path) -> dict[str, str]:
    zoo = __import__("zoo")
    return _names(zoo.model_class(name).from_pretrained(base_dir))


def applies(case: dict[str, Any], names: dict[str, str]) -> bool:
    return "head" in names or "head" not in case.get("lora", []) + case.get("modules_to_save", [])


def adapted(cls: Any, base_dir: Path, case_name: str, task_type: str | None) -> Any:
    """A real peft model of ``case_name`` on the base, every adapter tensor set to seeded noise, in eval mode."""
    from peft import get_peft_model

    from fixtures.adapter_builders import randomize

    base = cls.from_pretrained(base_dir)
    model = get_peft_model(base, _config(CASES[case_name], _names(base), task_type))
    randomize(model, 0)
    return model.eval()


def build_case(
    name: str,
    base_dir: Path,
    case_name: str,
    out_dir: Path,
    task_type: str | None = None,
    embedding_copies: Any = "auto",
) -> Path:
    """``case_name`` on the tied base of class ``name`` at ``base_dir``, written to ``out_dir`` by save_pretrained."""
    import torch

    zoo = __import__("zoo")
    model = adapted(zoo.model_class(name), base_dir, case_name, task_type)
    with torch.no_grad():
        model.save_pretrained(out_dir, save_embedding_layers=embedding_copies)
    return out_dir


def measure_class(name: str, class_dir: str) -> dict[str, Any]:
    """Build every case on one class and check it with peft run; the signatures and outcomes."""
    import torch

    from tieaudit.adapter.analysis import AdapterOptions, analyse_adapter
    from tieaudit.checkpoint import open_checkpoint

    base_dir = _tied_dir(Path(class_dir))
    if base_dir is None:
        return {"skipped": "no tied save in the zoo"}
    zoo = __import__("zoo")
    cls = zoo.model_class(name)
    try:
        names = _names(cls.from_pretrained(base_dir))
    except LookupError as exc:
        return {"skipped": str(exc)}
    outcomes: dict[str, dict[str, Any]] = {}
    defaults: dict[str, Any] | None = None
    unmeasured: dict[str, str] = {}
    os.environ["TIEAUDIT_NO_TABLE"] = "1"  # the peft check really runs (and the tie map is computed)
    for case_name, case in CASES.items():
        if not applies(case, names):
            continue
        for task_type in _task_types(name):
            label = f"{case_name}/{task_type or 'none'}"
            try:
                model = adapted(cls, base_dir, case_name, task_type)
            except Exception as exc:  # peft refuses this shape on this class: nothing to record
                unmeasured[label] = f"peft refuses it: {type(exc).__name__}: {_first(exc)}"
                continue
            for embedding_copies in ("auto", False):
                with tempfile.TemporaryDirectory() as tmp:
                    with torch.no_grad():
                        model.save_pretrained(tmp, save_embedding_layers=embedding_copies)
                    try:
                        found = _check(Path(tmp), base_dir, analyse_adapter, AdapterOptions, open_checkpoint)
                    except Exception as exc:
                        unmeasured[f"{label}/{embedding_copies}"] = f"{type(exc).__name__}: {_first(exc)}"
                        continue
                skip = peft_table.SIGNATURE_KEYS | set(peft_table.IGNORED)
                own = {k: v for k, v in found["config"].items() if k not in skip}
                if defaults is None:
                    defaults = own
                elif own != defaults:
                    raise RuntimeError(f"{label}: adapter_config.json keys outside the signature differ between cases")
                for sig, agrees, why in found["groups"]:
                    prev = outcomes.get(sig)
                    if prev is None or prev["agrees"]:
                        outcomes[sig] = {"agrees": agrees, "disagreement": why, "case": label}
                for why in found["unasked"]:
                    unmeasured[f"{label}/{embedding_copies}"] = why
            del model
    return {"signatures": outcomes, "defaults": defaults or {}, "unmeasured": unmeasured}


def _check(adapter_dir: Path, base_dir: Path, analyse: Any, options: Any, open_checkpoint: Any) -> dict[str, Any]:
    """The adapter checked as `check` checks it (peft run): per touched group, its signature and peft's agreement."""
    with contextlib.ExitStack() as stack:
        adapter = stack.enter_context(open_checkpoint(adapter_dir))
        result = analyse(adapter, str(adapter_dir), str(base_dir), options(), stack)
        ctx = result.context
        assert adapter.adapter_config is not None
        config = dict(adapter.adapter_config.data)
        groups = []
        for view in ctx.peft:
            sig = peft_table.signature(view.members, adapter.tensors, ctx.edits, ctx.settings, config)
            groups.append((sig, view.agrees, view.disagreement))
        unasked = [f"{', '.join(g)}: {why}" for g, why in ctx.unverified]
        unasked += [s.reason for s in result.skipped if s.check == "peft-confirmation"]
    return {"groups": groups, "config": config, "unasked": unasked}


def _first(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:200]


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
            result: dict[str, Any] = measure_class(task["cls"], task["dir"])
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {_first(exc)}", "trace": traceback.format_exc(limit=-3)}
        result["seconds"] = round(time.monotonic() - start, 2)
        answer.write(json.dumps(result) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# The whole table
# --------------------------------------------------------------------------------------------------------------------


def generate(zoo_dir: Path, jobs: int, classes: list[str] | None) -> dict[str, Any]:
    import zoo

    dirs = {d.name: d for d in sorted(zoo_dir.iterdir()) if d.is_dir() and (classes is None or d.name in classes)}
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    local = threading.local()
    workers: list[zoo._Worker] = []
    log = zoo_dir / "pefttable-workers.log"

    def run(name: str) -> None:
        worker = getattr(local, "worker", None)
        if worker is None or not worker.alive():
            worker = local.worker = zoo._Worker(log, script=__file__)
            with lock:
                workers.append(worker)
        result = worker.run({"cls": name, "dir": str(dirs[name])}, 900)
        if "status" in result:  # the worker died or timed out
            result = {"failed": result.get("reason", "worker failed")}
            local.worker = None
        with lock:
            results[name] = result
            done = len(results)
        if "signatures" in result:
            sigs = result["signatures"]
            bad = sum(not o["agrees"] for o in sigs.values())
            mark = f"{len(sigs)} signatures" + (f", {bad} DISAGREE" if bad else "")
        else:
            mark = f"-- {result.get('skipped') or result.get('failed')}"
        print(f"[{done}/{len(dirs)}] {name}: {mark} ({result.get('seconds', 0)} s)", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, dirs))
    for w in workers:
        w.close()
    (zoo_dir / "pefttable-raw.json").write_text(json.dumps(results, sort_keys=True))  # `--from-raw` rebuilds from it
    return assemble(results)


def assemble(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The table from the per-class measurements. The config values outside the signature are peft's defaults, the
    same for almost every class; a class whose adapters peft writes otherwise (e.g. `target_parameters: []` for
    mixture-of-experts classes) keeps its own under `class_defaults`."""
    from tieaudit.ties import table as tie_table

    version, digest = peft_table.peft_sources()
    # a class the shipped tie table does not hold has no recorded transformers sources to hold the record to
    for n, r in results.items():
        if r.get("signatures") and not tie_table.sources_match(n):
            results[n] = {"skipped": "not in the shipped tie table (no recorded transformers sources)"}
    measured = {n: r for n, r in sorted(results.items()) if r.get("signatures")}
    counts: dict[str, int] = {}
    for r in measured.values():
        key = json.dumps(r["defaults"], sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    defaults = json.loads(max(counts, key=lambda k: counts[k])) if counts else {}
    own = {
        n: {k: v for k, v in r["defaults"].items() if defaults.get(k, peft_table.MISSING) != v}
        for n, r in measured.items()
    }
    for n, r in measured.items():
        if set(r["defaults"]) != set(defaults):
            raise SystemExit(f"{n}: peft writes other adapter_config.json keys for this class")
    return {
        "format": peft_table.FORMAT,
        "peft": version,
        "peft_sha256": digest,
        "generated_by": "python tools/pefttable.py",
        "defaults": defaults,
        "class_defaults": {n: d for n, d in own.items() if d},
        "classes": {
            n: {sig: {k: o[k] for k in ("agrees", "disagreement")} for sig, o in sorted(r["signatures"].items())}
            for n, r in measured.items()
        },
        "not_measured": {
            n: r.get("skipped") or r.get("failed") or "no tied group the cases touch"
            for n, r in sorted(results.items())
            if not r.get("signatures")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None, help="the zoo directory (default: the test suite's cache)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--classes", default=None, help="comma-separated class names (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--from-raw", action="store_true", help="rebuild from the last run's measurements")
    args = parser.parse_args(argv)
    import zoo

    if args.zoo is None:
        args.zoo = zoo.default_dir()
    if args.from_raw:
        args.out.write_text(
            json.dumps(
                assemble(json.loads((args.zoo / "pefttable-raw.json").read_text())),
                separators=(",", ":"),
                sort_keys=True,
            )
            + "\n"
        )
        print(f"rebuilt -> {args.out}")
        return 0
    if not any(args.zoo.glob("*/clean/config.json")):
        print(f"no zoo at {args.zoo}: building it first (python tools/zoo.py build {args.zoo})", flush=True)
        zoo.sweep(zoo.tied_classes(), args.zoo, variants=("clean", "tied_clean"), jobs=args.jobs)
    classes = args.classes.split(",") if args.classes else None
    start = time.monotonic()
    table = generate(args.zoo, args.jobs, classes)
    if classes is not None and args.out.exists():  # a partial run updates the classes it ran
        old = json.loads(args.out.read_text())
        if (old["peft"], old["peft_sha256"]) != (table["peft"], table["peft_sha256"]):
            raise SystemExit("the table on disk was measured with another peft: regenerate it whole")
        old["classes"].update(table["classes"])
        for name in table["classes"]:
            old["class_defaults"].pop(name, None)
        old["class_defaults"].update(table["class_defaults"])
        for name in table["classes"]:
            old["not_measured"].pop(name, None)
        old["not_measured"].update(table["not_measured"])
        table = old
    args.out.write_text(json.dumps(table, separators=(",", ":"), sort_keys=True) + "\n")
    disagree = sum(not o["agrees"] for c in table["classes"].values() for o in c.values())
    print(
        f"{len(table['classes'])} classes measured, {len(table['not_measured'])} not; "
        f"{sum(len(c) for c in table['classes'].values())} signatures, {disagree} where peft disagreed; "
        f"{time.monotonic() - start:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["_worker"]:
        _worker()
    else:
        sys.exit(main())
