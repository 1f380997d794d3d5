"""llama2.c's exported model files (tieaudit/formats/llama2c.py, rules TIE221-TIE222).

`export` reproduces llama2.c's export.py (karpathy/llama2.c at 350e04f: `legacy_export`, `version1_export`,
`version2_export`) byte for byte in layout, and `run_c_head` what run.c's `memory_map_weights` takes as the
classifier of a v0 file; the files are written from a small llama2.c-shaped model (its tensors, not its forward).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tieaudit import audit

DIM, HIDDEN, LAYERS, HEADS, KV, VOCAB, SEQ = 32, 64, 2, 4, 2, 48, 16
GROUP = 32
RNG = np.random.default_rng(0)


def model(shared: bool) -> dict[str, object]:
    kv_dim = DIM * KV // HEADS
    layers = [
        {
            "attention_norm": RNG.standard_normal(DIM),
            "ffn_norm": RNG.standard_normal(DIM),
            "wq": RNG.standard_normal((DIM, DIM)),
            "wk": RNG.standard_normal((kv_dim, DIM)),
            "wv": RNG.standard_normal((kv_dim, DIM)),
            "wo": RNG.standard_normal((DIM, DIM)),
            "w1": RNG.standard_normal((HIDDEN, DIM)),
            "w2": RNG.standard_normal((DIM, HIDDEN)),
            "w3": RNG.standard_normal((HIDDEN, DIM)),
        }
        for _ in range(LAYERS)
    ]
    tok = RNG.standard_normal((VOCAB, DIM))
    head_size = DIM // HEADS
    freqs = RNG.standard_normal((SEQ, head_size // 2))
    return {
        "tok": tok,
        "output": tok.copy() if shared else RNG.standard_normal((VOCAB, DIM)),
        "norm": RNG.standard_normal(DIM),
        "layers": layers,
        "freqs_cos": freqs,
        "freqs_sin": freqs,
    }


def _f32(a: object) -> bytes:
    return np.asarray(a, dtype="<f4").tobytes()


def _q80(w: np.ndarray) -> bytes:
    """export.py's quantize_q80: per group of GROUP values, int8 round(w / (max|w| / 127)), then the float32 scales."""
    g = np.asarray(w, np.float32).reshape(-1, GROUP)
    scale = np.abs(g).max(axis=1) / 127.0
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q.tobytes() + scale.astype("<f4").tobytes()


def export(m: dict, path: Path, version: int, shared: bool | None = None) -> Path:
    """export.py's layouts. ``shared``: the flag written (default: torch.equal(tok_embeddings, output), as export.py
    decides it)."""
    flag = bool(np.array_equal(m["tok"], m["output"])) if shared is None else shared
    layers = m["layers"]
    out = bytearray()
    ints = (DIM, HIDDEN, LAYERS, HEADS, KV)
    if version == 0:
        out += struct.pack("<7i", *ints, VOCAB if flag else -VOCAB, SEQ)
        out += _f32(m["tok"])
        for key in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
            out += b"".join(_f32(layer[key]) for layer in layers)
        out += _f32(m["norm"]) + _f32(m["freqs_cos"][:SEQ]) + _f32(m["freqs_sin"][:SEQ])
        if not flag:
            out += _f32(m["output"])
    else:
        out += struct.pack("<Ii", 0x616B3432, version) + struct.pack("<7i", *ints, VOCAB, SEQ) + struct.pack("B", flag)
        if version == 2:
            out += struct.pack("<i", GROUP)
        out += b"\0" * (256 - len(out))
        for key in ("attention_norm", "ffn_norm"):
            out += b"".join(_f32(layer[key]) for layer in layers)
        out += _f32(m["norm"])
        weights = [m["tok"], *[layer[k] for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for layer in layers]]
        if not flag:
            weights.append(m["output"])
        out += b"".join(_f32(w) if version == 1 else _q80(w) for w in weights)
    path.write_bytes(bytes(out))
    return path


def run_c_head(path: Path) -> np.ndarray:
    """run.c's read_checkpoint + memory_map_weights for a v0 file: the matrix it uses as the classifier (wcls)."""
    data = path.read_bytes()
    dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", data[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    floats = np.frombuffer(data[28:], dtype="<f4")
    hs = dim // heads
    kv_dim = dim * kv // heads
    at = vocab * dim  # token_embedding_table
    at += layers * dim + layers * dim * dim * 2 + layers * dim * kv_dim * 2 + layers * dim  # norms, wq, wk, wv, wo
    at += layers * dim * hidden * 3 + dim  # w1, w2, w3, final norm
    at += seq * hs // 2 * 2  # "skip what used to be freq_cis_real / imag"
    table = floats[: vocab * dim] if shared else floats[at : at + vocab * dim]
    return table.reshape(vocab, dim)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_exports_as_written_are_clean(version: int, tmp_path: Path) -> None:
    for shared in (True, False):
        report = audit(export(model(shared), tmp_path / f"{shared}.bin", version))
        assert [f.code for f in report.findings] == [], (version, shared)
        assert report.groups[0].status.value == ("tied" if shared else "untied")
        assert report.stats.tensor_bytes_read == 0


@pytest.mark.parametrize("version", [0, 1, 2])
def test_a_shared_flag_over_a_stored_classifier(version: int, tmp_path: Path) -> None:
    m = model(False)
    right = export(m, tmp_path / "right.bin", version)
    wrong = tmp_path / "wrong.bin"
    data = bytearray(right.read_bytes())
    if version == 0:
        data[20:24] = struct.pack("<i", VOCAB)  # the sign flipped: "shared"
    else:
        data[36] = 1
    wrong.write_bytes(bytes(data))
    if version == 0:  # run.c uses the embedding and never reads the trained classifier
        assert np.array_equal(run_c_head(right), np.asarray(m["output"], np.float32))
        assert np.array_equal(run_c_head(wrong), np.asarray(m["tok"], np.float32))
    assert [f.code for f in audit(wrong).findings] == ["TIE221"]


@pytest.mark.parametrize("version", [0, 1, 2])
def test_an_unshared_flag_without_the_classifier(version: int, tmp_path: Path) -> None:
    m = model(False)
    full = export(m, tmp_path / "full.bin", version)
    cut = tmp_path / "cut.bin"
    classifier = VOCAB * DIM * 4 if version < 2 else VOCAB * DIM + VOCAB * DIM // GROUP * 4
    cut.write_bytes(full.read_bytes()[:-classifier])
    assert [f.code for f in audit(cut).findings] == ["TIE222"]


@pytest.mark.parametrize("version", [1, 2])
def test_a_truncated_file_is_one_line_and_exit_2(version: int, tmp_path: Path) -> None:
    path = export(model(True), tmp_path / "m.bin", version)
    path.write_bytes(path.read_bytes()[:-7])
    exe = Path(sys.executable).parent / "tieaudit"
    proc = subprocess.run([str(exe), "check", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "truncated" in proc.stderr
