"""Hostile inputs, through the real command line, the way trusted file-format tools are tested.

Every case of the corpus is generated here from a real checkpoint (nothing binary is committed) and run as
`tieaudit check` in a subprocess with an address-space limit (3 GiB) and a timeout. Each must end with the
documented exit code and one specific line on stderr, no traceback, nothing executed (a pickle payload would
create a marker file) and the input untouched (hash of every entry before and after). Where the case is a
safetensors file, tieaudit's verdict is compared with the safetensors library's own: tieaudit refuses exactly what
`safe_open` cannot read.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_checkpoint import _split
from tests.test_fix import _read_only, assert_loads_as_intended

ROOT = Path(__file__).resolve().parents[1]
CLEAN = ROOT / "fixtures" / "demo" / "llama-clean"
WEIGHTS = "model.safetensors"
MEMORY_LIMIT = 3 * 2**30
TIMEOUT = 120


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run(
        [sys.executable, "-m", "tieaudit", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", **(env or {})},
        preexec_fn=limits,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )


def tree_state(root: Path) -> dict[str, object]:
    """Every entry under `root` (not following symlinks): kind, mode, size, mtime and, for files, a content hash."""
    state: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            entry: tuple[object, ...] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode):
                entry += (hashlib.sha256(p.read_bytes()).hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            state[str(p.relative_to(root))] = entry
    return state


# -- the corpus ----------------------------------------------------------------------------------------------------


def _pack(header: dict | bytes, data: bytes, n: int | None = None, align: bool = True) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if align:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if n is None else n) + text + data


def _weights(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        w = d / WEIGHTS
        w.write_bytes(change(w.read_bytes()))

    return apply


def _header(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(raw: bytes) -> bytes:
        header, data = _split(raw)
        change(header)
        return _pack(header, data)

    return _weights(edit)


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _boundary(which: str) -> Callable[[bytes], bytes]:
    """Truncate the file at one of its structural boundaries."""

    def cut(raw: bytes) -> bytes:
        n = struct.unpack("<Q", raw[:8])[0]
        header, _ = _split(raw)
        first = header[_tensors(header)[0]]["data_offsets"]
        at = {
            "empty": 0,
            "inside-length": 4,
            "after-length": 8,
            "inside-header": 8 + n // 2,
            "after-header": 8 + n,
            "inside-first-tensor": 8 + n + (first[0] + first[1]) // 2,
            "after-first-tensor": 8 + n + first[1],
            "last-byte-missing": len(raw) - 1,
        }[which]
        return raw[:at]

    return cut


def _swap_offsets(header: dict) -> None:
    """Two tensors of equal size exchange their data ranges: out of order, still contiguous and valid."""
    by_size: dict[int, list[str]] = {}
    for k in _tensors(header):
        b, e = header[k]["data_offsets"]
        by_size.setdefault(e - b, []).append(k)
    a, b = next(v for v in by_size.values() if len(v) >= 2)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


def _gap(raw: bytes) -> bytes:
    """Data regions that leave a hole: every tensor moved 8 bytes later, the file 8 bytes longer."""
    header, data = _split(raw)
    for k in _tensors(header):
        b, e = header[k]["data_offsets"]
        header[k]["data_offsets"] = [b + 8, e + 8]
    return _pack(header, b"\0" * 8 + data)


def _unaligned(raw: bytes) -> bytes:
    header, data = _split(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8) + b"   "  # 3 bytes past a multiple of 8
    return _pack(text, data, align=False)


def _duplicate(raw: bytes) -> bytes:
    header, data = _split(raw)
    name = _tensors(header)[-1]
    text = json.dumps(header)
    return _pack((text[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}").encode(), data)


def _overlap(header: dict) -> None:
    names = _tensors(header)
    same = [k for k in names if header[k]["shape"] == header[names[-1]]["shape"] and k != names[-1]]
    header[names[-1]]["data_offsets"] = header[same[0]]["data_offsets"]


def _set(field: str, value: object) -> Callable[[Path], None]:
    return _header(lambda h: h[_tensors(h)[-1]].__setitem__(field, value))


def _config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        change(cfg)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))

    return apply


def _raw_config(text: bytes) -> Callable[[Path], None]:
    return lambda d: (d / "config.json").write_bytes(text)


def _sharded(change: Callable[[Path, dict], None]) -> Callable[[Path], None]:
    """Split the weights into an index and two shards (real safetensors files), then let `change` edit them."""

    def apply(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / WEIGHTS)
        (d / WEIGHTS).unlink()
        names = sorted(tensors)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for shard, members in shards.items():
            save_file({n: tensors[n] for n in members}, d / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(members, shard))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        change(d, index)
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    return apply


def _symlink(target: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / WEIGHTS).unlink()
        os.symlink(target, d / WEIGHTS)

    return apply


def _fifo(d: Path) -> None:
    (d / WEIGHTS).unlink()
    os.mkfifo(d / WEIGHTS)


def _device(d: Path) -> None:
    (d / WEIGHTS).unlink()
    try:
        os.mknod(d / WEIGHTS, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("mknod is not permitted here (the symlink-to-device case still runs)")


class Payload:
    """Unpickling this runs `touch MARKER`: only a loader that executes code would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _pickle(d: Path) -> None:
    import torch

    (d / WEIGHTS).unlink()
    torch.save({"model.embed_tokens.weight": Payload(d.parent / "MARKER")}, d / "pytorch_model.bin")


def _zip_bomb(d: Path) -> None:
    """A `.bin` (a zip, as torch.save writes) whose pickle entry inflates from ~1 MiB to 1 GiB."""
    (d / WEIGHTS).unlink()
    with zipfile.ZipFile(d / "pytorch_model.bin", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as fh:
            block = b"\0" * 2**20
            for _ in range(1024):
                fh.write(block)
        zf.writestr("archive/version", "3\n")


def _huge_config(d: Path) -> None:
    with open(d / "config.json", "r+b") as fh:
        fh.truncate(64 * 2**20 + 1)  # sparse, one byte over the 64 MiB limit for a JSON file


# name -> (make the broken checkpoint, expected exit code, a fragment of the one-line error (None: no error line))
CORPUS: dict[str, tuple[Callable[[Path], None], int, str | None]] = {
    **{
        f"truncated-{where}": (_weights(_boundary(where)), 2, msg)
        for where, msg in [
            ("empty", "too short"),
            ("inside-length", "too short"),
            ("after-length", "larger than the rest"),
            ("inside-header", "larger than the rest"),
            ("after-header", "past the end of the file"),
            ("inside-first-tensor", "past the end of the file"),
            ("after-first-tensor", "past the end of the file"),
            ("last-byte-missing", "past the end of the file"),
        ]
    },
    "header-length-absurd": (_weights(lambda r: struct.pack("<Q", 2**63) + r[8:]), 2, "absurd"),
    "header-length-past-end": (_weights(lambda r: struct.pack("<Q", len(r)) + r[8:]), 2, "larger than the rest"),
    "header-length-not-8-aligned": (_weights(_unaligned), 0, None),  # safetensors reads it too
    "header-not-utf8": (_weights(lambda r: r[:9] + b"\xff" + r[10:]), 2, "UTF-8"),
    "header-not-json": (_weights(lambda r: r[:8] + b"x" + r[9:]), 2, "not valid JSON"),
    "duplicate-tensor-names": (_weights(_duplicate), 2, "duplicate key"),
    "overlapping-offsets": (_header(_overlap), 2, "overlap"),
    "out-of-order-offsets": (_header(_swap_offsets), 0, None),  # contiguous, just permuted: valid
    "hole-between-offsets": (_weights(_gap), 2, "belong to no tensor (a hole before"),
    "trailing-data-bytes": (_weights(lambda r: r + b"\0" * 8), 2, "after the last tensor belong to no tensor"),
    "bytes-disagree-with-shape": (_set("shape", [3]), 2, "needs"),
    "unknown-dtype": (_set("dtype", "F128"), 2, "unsupported dtype"),
    "negative-shape": (_set("shape", [-16]), 2, "non-negative integers"),
    "overflowing-shape": (_set("shape", [2**62, 2**62, 2**62]), 2, "needs"),
    "index-names-missing-shard": (
        _sharded(lambda d, idx: (d / "model-00002-of-00002.safetensors").unlink()),
        2,
        "does not exist",
    ),
    "index-tensor-absent-from-shard": (
        _sharded(lambda d, idx: idx["weight_map"].__setitem__("lm_head.weight", "model-00001-of-00002.safetensors")),
        1,
        None,  # a finding (the index disagrees with the files), not an unreadable checkpoint
    ),
    "config-flag-yes": (_config(lambda c: c.__setitem__("tie_word_embeddings", "yes")), 2, "expected true or false"),
    "config-flag-null": (_config(lambda c: c.__setitem__("tie_word_embeddings", None)), 2, "expected true or false"),
    "config-architectures-not-list": (_config(lambda c: c.__setitem__("architectures", "Llama")), 2, "architectures"),
    "config-not-json": (_raw_config(b'{"tie_word_embeddings": tru'), 2, "invalid JSON"),
    "config-not-object": (_raw_config(b"[1, 2]"), 2, "expected a JSON object"),
    "config-too-large": (_huge_config, 2, "too large"),
    "unknown-architecture": (
        _config(lambda c: c.__setitem__("architectures", ["NoSuchModelForCausalLM"])),
        0,
        None,  # audited from the files alone; the report says which checks were skipped
    ),
    "symlink-loop": (_symlink(WEIGHTS), 2, WEIGHTS),
    "symlink-escaping": (_symlink(str(ROOT / "README.md")), 2, "outside"),
    "symlink-to-device": (_symlink("/dev/zero"), 2, "outside"),
    "fifo": (_fifo, 2, "not a regular file"),
    "device-file": (_device, 2, "not a regular file"),
    "pickle-with-reduce-payload": (_pickle, 2, "pytorch_model.bin"),
    "zip-bomb-bin": (_zip_bomb, 2, "pytorch_model.bin"),
}

# where tieaudit and the safetensors library must agree on readable vs not. Not duplicate names: the library keeps
# the last entry silently; tieaudit refuses the ambiguity (two parsers may pick different entries).
SAFETENSORS_CASES = {n for n in CORPUS if n.startswith(("truncated", "header", "overlapping"))} | {
    "out-of-order-offsets",
    "hole-between-offsets",
    "trailing-data-bytes",
    "bytes-disagree-with-shape",
    "unknown-dtype",
    "negative-shape",
    "overflowing-shape",
}


def _library_reads(path: Path) -> bool:
    """Whether the safetensors library opens the file and reads every tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                f.get_tensor(k)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_input(case: str, tmp_path: Path) -> None:
    make, code, fragment = CORPUS[case]
    target = tmp_path / "ckpt"
    shutil.copytree(CLEAN, target)
    make(target)
    before = tree_state(tmp_path)
    proc = run_cli("check", target, "--no-progress")
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    if fragment is not None:
        assert len(lines) == 1 and lines[0].startswith("tieaudit: error: "), proc.stderr
        assert fragment in lines[0], lines[0]
        assert proc.stdout == ""
    assert not (tmp_path / "MARKER").exists()  # nothing was executed
    assert tree_state(tmp_path) == before  # nothing was changed, created or removed
    if case in SAFETENSORS_CASES:
        assert _library_reads(target / WEIGHTS) == (code != 2), "tieaudit and safetensors disagree"


def test_every_case_of_the_issue_is_in_the_corpus() -> None:
    wanted = [
        "truncated-",
        "header-length-past-end",
        "header-length-absurd",
        "header-length-not-8-aligned",
        "header-not-utf8",
        "header-not-json",
        "duplicate-tensor-names",
        "overlapping-offsets",
        "out-of-order-offsets",
        "bytes-disagree-with-shape",
        "negative-shape",
        "overflowing-shape",
        "index-names-missing-shard",
        "index-tensor-absent-from-shard",
        "config-flag-yes",
        "unknown-architecture",
        "symlink-loop",
        "symlink-escaping",
        "fifo",
        "device-file",
        "pickle-with-reduce-payload",
        "zip-bomb-bin",
    ]
    assert all(any(name.startswith(w) for name in CORPUS) for w in wanted)
    assert sum(name.startswith("truncated-") for name in CORPUS) >= 8  # every structural boundary


# -- concurrency, faults and the read-only guarantee ---------------------------------------------------------------


def _start_paused(args: list[str], point: str, gate: Path) -> subprocess.Popen[str]:
    """A tieaudit process that stops at `point` of its write (holding whatever it holds) until `gate` is removed."""
    gate.touch()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "faultrun.py"), f"{point}:pause:{gate}", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    ready = Path(f"{gate}.ready")
    for _ in range(6000):
        if ready.exists() or proc.poll() is not None:
            break
        import time

        time.sleep(0.02)
    assert ready.exists(), proc.communicate()
    return proc


def test_two_in_place_fixes_never_interleave(checkpoint, tmp_path: Path, outcome, intended) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama", "untied_missing", "safetensors"), src)
    before = tree_state(src)
    gate = tmp_path / "gate"
    first = _start_paused(["fix", str(src), "--untie", "--in-place", "-y"], "weights", gate)
    try:
        second = run_cli("fix", src, "--untie", "--in-place", "-y")
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert line == (
            f"tieaudit: error: {src} is being rewritten by another tieaudit process (pid {first.pid}); "
            "nothing was changed: run again when it has finished"
        )
        assert tree_state(src) == before  # the second wrote nothing; the first has not switched yet
    finally:
        gate.unlink()
    _, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err
    assert not list(tmp_path.glob(".ckpt.tieaudit-*"))  # lock and staging gone
    assert_loads_as_intended(src, "llama", intended("llama", "untied_missing"), outcome)
    assert run_cli("fix", src, "--untie", "--in-place", "-y").returncode == 0  # free again: nothing left to fix


def test_a_killed_holder_does_not_block_the_next_run(checkpoint, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama", "untied_missing", "safetensors"), src)
    killed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "faultrun.py"),
            "weights",
            "fix",
            str(src),
            "--untie",
            "--in-place",
            "-y",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert killed.returncode == -9
    assert (tmp_path / ".ckpt.tieaudit-lock").exists()  # the file stays; the kernel released the lock
    again = run_cli("fix", src, "--untie", "--in-place", "-y")
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".ckpt.tieaudit-*"))


@pytest.mark.parametrize("command", ["fix", "merge"])
def test_output_parent_removed_mid_run(command: str, checkpoint, adapter_case, tmp_path: Path) -> None:
    """The directory that would receive the output disappears while the output is being written: exit 2, one
    line, the input untouched, nothing half-written anywhere."""
    if command == "fix":
        src = tmp_path / "in" / "ckpt"
        shutil.copytree(checkpoint("llama", "untied_missing", "safetensors"), src)
        args = ["fix", str(src), "--untie"]
    else:
        base, adapter, _ = adapter_case("llama", "lora_head")
        src = tmp_path / "in" / "adapter"
        shutil.copytree(adapter, src)
        args = ["merge", str(src), "--base", str(base)]
    before = tree_state(tmp_path / "in")
    parent = tmp_path / "out"
    gate = tmp_path / "gate"
    proc = _start_paused([*args, "--output-dir", str(parent / "result")], "weights", gate)
    shutil.rmtree(parent)  # staging directory and all
    gate.unlink()
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("tieaudit: error: ") and "Traceback" not in err
    assert tree_state(tmp_path / "in") == before
    assert not parent.exists()


def test_check_and_graph_never_write(checkpoint, adapter_case, tmp_path: Path) -> None:
    """The read-only guarantee: every entry of the audited directories is made immutable (root ignores modes, so
    `chattr +i`), and every format of check, graph, and --deep on an adapter still work, with nothing changed."""
    base, adapter, _ = adapter_case("llama", "lora_head")
    targets = {
        "model": checkpoint("llama", "diverged", "safetensors-sharded"),
        "bin": checkpoint("gpt2", "untied_missing", "bin"),
        "base": base,
        "adapter": adapter,
    }
    copies = {}
    for name, path in targets.items():
        copies[name] = tmp_path / name
        shutil.copytree(path, copies[name])
    if copies["adapter"].joinpath("adapter_config.json").exists():
        cfg = json.loads((copies["adapter"] / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(copies["base"])
        (copies["adapter"] / "adapter_config.json").write_text(json.dumps(cfg))
    from typer.testing import CliRunner

    from tieaudit.cli.app import app

    runner = CliRunner()
    before = tree_state(tmp_path)
    entries = [p for c in copies.values() for p in [c, *c.rglob("*")]]
    for p in entries:
        _read_only(p, True)
    try:
        for name, path in copies.items():  # in-process: the file system is what is under test, not start-up
            formats = ("text", "json", "sarif", "github", "markdown") if name == "model" else ("json",)
            for fmt in formats:
                result = runner.invoke(app, ["check", str(path), "-f", fmt, "--no-progress"])
                assert result.exit_code in (0, 1), (name, fmt, result.stderr)
            for fmt in ("text", "json", "mermaid", "dot") if name == "model" else ("json",):
                result = runner.invoke(app, ["graph", str(path), "-f", fmt])
                assert result.exit_code == 0, (name, fmt, result.stderr)
        deep = runner.invoke(app, ["check", str(copies["adapter"]), "--deep", "-f", "json"])
        assert deep.exit_code in (0, 1) and json.loads(deep.stdout)["comparisons"], deep.stderr
        batch = runner.invoke(app, ["check", str(copies["model"]), str(copies["bin"]), "-f", "json"])
        assert batch.exit_code == 1, batch.stderr
    finally:
        for p in reversed(entries):
            _read_only(p, False)
    assert tree_state(tmp_path) == before
