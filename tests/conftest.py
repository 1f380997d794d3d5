"""Shared, session-scoped fixtures: real tiny checkpoints built once per test worker."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tie-map cache of this test session, never the user's ~/.cache/tieaudit
os.environ["TIEAUDIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tieaudit-test-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

Builder = Callable[[str, str, str], Path]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The zoo sweep (minutes, its own worker processes) first, so one xdist worker runs it while the other runs
    everything else, instead of it starting last and adding its whole duration to the run."""
    items.sort(key=lambda item: item.get_closest_marker("zoo") is None)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Builder:
    """`checkpoint(arch, variant, layout)` -> a directory built with the real libraries (cached)."""
    from fixtures.builders import build_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, variant: str, layout: str) -> Path:
        key = (arch, variant, layout)
        if key not in cache:
            cache[key] = build_checkpoint(arch, variant, layout, root / "-".join(key))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def outcome() -> Callable[[Path, str], object]:
    """What transformers really does when loading a checkpoint (cached per path)."""
    from fixtures.builders import load_outcome

    cache: dict[Path, object] = {}

    def get(path: Path, arch: str) -> object:
        if path not in cache:
            cache[path] = load_outcome(path, arch)
        return cache[path]

    return get


@pytest.fixture(scope="session")
def adapter_case(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Path, Path, object]]:
    """`adapter_case(arch, case)` -> (base_dir, adapter_dir, Reality): a real base, a real peft adapter with
    non-zero deltas, and what peft's merge -> save -> reload really does (built once per session)."""
    from fixtures.adapter_builders import build_adapter, build_base, case_base_tied, reality

    root = tmp_path_factory.mktemp("adapters")
    bases: dict[tuple[str, bool], Path] = {}
    cache: dict[tuple[str, str], tuple[Path, Path, object]] = {}

    def get(arch: str, case: str) -> tuple[Path, Path, object]:
        if (arch, case) not in cache:
            tied = case_base_tied(case)
            if (arch, tied) not in bases:
                bases[arch, tied] = build_base(arch, root / f"{arch}-base-{'tied' if tied else 'untied'}", tied=tied)
            base = bases[arch, tied]
            adapter = build_adapter(arch, case, base, root / f"{arch}-{case}")
            cache[arch, case] = (base, adapter, reality(base, adapter))
        return cache[arch, case]

    return get


@pytest.fixture(scope="session")
def intended() -> Callable[[str, str], object]:
    """`intended(arch, variant)` -> the logits of the model a fixture saved: what a repair must reproduce."""
    from fixtures.builders import intended_model, model_logits

    cache: dict[tuple[str, str], object] = {}

    def get(arch: str, variant: str) -> object:
        if (arch, variant) not in cache:
            cache[arch, variant] = model_logits(intended_model(arch, variant), arch)
        return cache[arch, variant]

    return get
