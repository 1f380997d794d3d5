"""The layout's promises (docs/architecture.md), checked on the source: which package may import which, why an import
sits inside a function, and that the package reads no undocumented switches from the environment."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tieaudit"
DOCS = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])

# third-party modules a path may never need, so they are imported where used (docs/architecture.md, "Lazy imports")
HEAVY = {
    "torch",
    "transformers",
    "peft",
    "numpy",
    "safetensors",
    "huggingface_hub",
    "rich",
    "typer",
    "threadpoolctl",
    "gguf",
}

# package -> tieaudit packages it must never import (module level or inside functions)
NEVER = {
    "checkpoint": ("ties", "adapter", "rules", "report", "repair", "cli"),
    "ties": ("adapter", "rules", "report", "repair", "cli"),
    "adapter": ("rules", "report", "repair", "cli"),
    "formats": ("adapter", "rules", "report", "repair", "cli"),
    "rules": ("report", "repair", "cli"),
    "report": ("repair", "cli", "adapter", "ties", "checkpoint"),
    "repair": ("cli",),
}


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[tuple[ast.ImportFrom | ast.Import, bool, str]]:
    """(node, inside a function, the source line) for every import of a file, TYPE_CHECKING blocks excluded."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            checking |= {id(n) for n in ast.walk(node)}
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn)}
    return [
        (n, id(n) in inside, lines[n.lineno - 1])
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in checking
    ]


def _module(node: ast.ImportFrom | ast.Import) -> str:
    return (node.module or "") if isinstance(node, ast.ImportFrom) else node.names[0].name


@pytest.mark.parametrize("package", sorted(NEVER))
def test_packages_import_only_what_the_layout_allows(package: str) -> None:
    bad = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node, _, _ in _imports(path):
            mod = _module(node)
            for other in NEVER[package]:
                if mod == f"tieaudit.{other}" or mod.startswith(f"tieaudit.{other}."):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_cli() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _sources()
        if "cli" not in path.relative_to(PACKAGE).parts and path.name != "__main__.py"
        for node, _, _ in _imports(path)
        if _module(node).startswith("tieaudit.cli")
    ]
    assert not bad


def test_every_import_inside_a_function_says_why() -> None:
    """A function-level import is a heavy third-party module, or carries `# lazy: <reason>` (start-up cost measured,
    a platform-only module, an import cycle). Anything else belongs at the top of the file."""
    bad = []
    for path in _sources():
        for node, inside, line in _imports(path):
            if not inside:
                continue
            top = _module(node).split(".")[0]
            if top in HEAVY or re.search(r"#\s*lazy:\s*\S", line):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
    assert not bad, "imports inside functions without a reason:\n" + "\n".join(bad)


def test_environment_variables_read_by_the_package_are_documented() -> None:
    """No hidden switches (test hooks, debug toggles) ship in the package: every variable it reads is in the docs."""
    names = set()
    for path in _sources():
        names |= set(re.findall(r"environ(?:\.get)?\(\s*\"([A-Z_]+)\"", path.read_text()))
        names |= set(re.findall(r"environ\[\"([A-Z_]+)\"\]", path.read_text()))
    # the peft oracle sets these two for its own call and restores them; they are transformers' and the hub's
    names -= {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    assert names, "the scan found no environment variables at all: the pattern is broken"
    undocumented = sorted(n for n in names if n not in DOCS)
    assert not undocumented, undocumented
