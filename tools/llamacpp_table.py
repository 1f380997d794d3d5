"""Generate ``tieaudit/formats/llamacpp_output.json``: how llama.cpp's loader treats ``output.weight`` (the LM head) for
every architecture it can load, read from llama.cpp's own sources (never guessed per name).

    python tools/llamacpp_table.py LLAMA_CPP [--rev REV]

LLAMA_CPP is a llama.cpp checkout or a bare git mirror (then ``--rev``, default HEAD, is read with ``git show``).
The chain followed, as the loader runs it:

1. ``src/llama-arch.cpp``: ``LLM_ARCH_NAMES`` maps each ``LLM_ARCH_*`` to the string GGUF files carry in
   ``general.architecture``;
2. ``src/llama-model.cpp``: ``llama_model_mapping`` maps each ``LLM_ARCH_*`` to its model class;
3. ``src/models/models.h``: a class without its own ``load_arch_tensors`` inherits its parent's;
4. ``src/models/*.cpp``: in that ``load_arch_tensors``, the statement that assigns ``output``:

   - ``create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), ..., TENSOR_NOT_REQUIRED)`` followed by an
     ``create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), ..., TENSOR_DUPLICATED)``: **fallback** (a file without
     ``output.weight`` runs with the input embedding as its head: tied);
   - the same without the fallback: **optional** (no own head; draft models take the target's);
   - ``create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), ..., 0)`` or any flags without ``TENSOR_NOT_REQUIRED``:
     **required** (a file without it fails: ``tensor 'output.weight' not found``);
   - only ``create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), ..., TENSOR_DUPLICATED)``: **embedding** (always
     tied; a file that holds ``output.weight`` fails: ``wrong number of tensors``, as the loader counts every tensor
     it did not create);
   - neither: **absent** (no output tensor is loaded; a file that holds one fails the same way).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tieaudit" / "formats" / "llamacpp_output.json"
FORMAT = 1


class Source:
    """Files of a llama.cpp tree: a checkout, or a bare mirror read at a revision."""

    def __init__(self, root: Path, rev: str) -> None:
        self.root, self.rev = root, rev
        self.git = not (root / "src").is_dir()

    def read(self, rel: str) -> str:
        if not self.git:
            return (self.root / rel).read_text(encoding="utf-8")
        out = subprocess.run(
            ["git", "-C", str(self.root), "show", f"{self.rev}:{rel}"], capture_output=True, check=True
        )
        return out.stdout.decode("utf-8")

    def listing(self, rel: str) -> list[str]:
        if not self.git:
            return sorted(p.name for p in (self.root / rel).iterdir())
        out = subprocess.run(
            ["git", "-C", str(self.root), "ls-tree", "--name-only", f"{self.rev}:{rel}"],
            capture_output=True,
            check=True,
        )
        return sorted(out.stdout.decode().split())

    def commit(self) -> str:
        cmd = ["git", "-C", str(self.root), "rev-parse", self.rev if self.git else "HEAD"]
        return subprocess.run(cmd, capture_output=True, check=True, text=True).stdout.strip()


def _body(text: str, start: int) -> str:
    """The brace-balanced block that opens at or after ``start``."""
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    raise ValueError("unbalanced braces")


def _strip_comments(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    return re.sub(r"//[^\n]*", "", code)


OUTPUT = re.compile(r"\boutput\s*=\s*create_tensor\(\s*tn\(\s*LLM_TENSOR_OUTPUT\s*,\s*\"weight\"\s*\)(.*?)\);", re.S)
DUPLICATE = re.compile(
    r"\boutput\s*=\s*create_tensor\(\s*tn\(\s*LLM_TENSOR_TOKEN_EMBD\s*,\s*\"weight\"\s*\)[^;]*TENSOR_DUPLICATED", re.S
)


def classify(body: str) -> tuple[str, str]:
    """(rule, the statement it was read from) for one load_arch_tensors body."""
    code = _strip_comments(body)
    out = OUTPUT.search(code)
    dup = DUPLICATE.search(code)
    if out is None:
        if dup is not None:
            return "embedding", " ".join(dup.group(0).split())
        return "absent", ""
    statement = " ".join(out.group(0).split())
    flags = out.group(1).rsplit(",", 1)[-1].strip()
    if "TENSOR_NOT_REQUIRED" not in flags and flags != "0" and not flags.endswith("flags"):
        raise ValueError(f"unrecognised flags {flags!r} in {statement}")
    if "TENSOR_NOT_REQUIRED" in flags:
        return ("fallback" if dup is not None and dup.start() > out.start() else "optional"), statement
    # required (flags 0, or a variable such as step35's trunk_flags that is 0 for a full model)
    return "required", statement


def generate(src: Source) -> dict[str, Any]:
    arch_cpp = src.read("src/llama-arch.cpp")
    names_block = _body(arch_cpp, arch_cpp.index("LLM_ARCH_NAMES"))
    names = dict(re.findall(r"\{\s*(LLM_ARCH_\w+)\s*,\s*\"([^\"]+)\"\s*\}", names_block))
    model_cpp = src.read("src/llama-model.cpp")
    mapping_block = _body(model_cpp, model_cpp.index("llama_model_mapping("))
    classes: dict[str, str] = {}
    pending: list[str] = []
    for token in re.finditer(r"case\s+(LLM_ARCH_\w+)\s*:|return\s+new\s+(llama_model_\w+)\s*\(", mapping_block):
        if token.group(1):
            pending.append(token.group(1))
        else:
            for arch in pending:
                classes[arch] = token.group(2)
            pending = []
    header = src.read("src/models/models.h")
    parents = dict(re.findall(r"struct\s+(llama_model_\w+)\s*:\s*public\s+(llama_model_\w+)", header))
    bodies: dict[str, tuple[str, str]] = {}
    for file in src.listing("src/models"):
        if not file.endswith(".cpp"):
            continue
        text = src.read(f"src/models/{file}")
        for m in re.finditer(r"void\s+(llama_model_\w+)::load_arch_tensors\s*\(", text):
            bodies[m.group(1)] = (_body(text, m.end()), f"src/models/{file}")
    out: dict[str, Any] = {}
    for arch, cls in sorted(classes.items()):
        owner = cls
        while owner not in bodies and owner in parents:
            owner = parents[owner]
        if owner not in bodies:
            raise SystemExit(f"{arch}: no load_arch_tensors for {cls}")
        body, file = bodies[owner]
        rule, statement = classify(body)
        out[names[arch]] = {"rule": rule, "class": cls, "source": file, "statement": statement}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llama_cpp", type=Path)
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    src = Source(args.llama_cpp, args.rev)
    archs = generate(src)
    table = {
        "format": FORMAT,
        "llama_cpp_commit": src.commit(),
        "generated_by": "python tools/llamacpp_table.py LLAMA_CPP",
        "architectures": archs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    counts: dict[str, int] = {}
    for a in archs.values():
        counts[a["rule"]] = counts.get(a["rule"], 0) + 1
    print(f"{len(archs)} architectures: {counts} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
