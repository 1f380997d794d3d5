"""GGUF files (tieaudit/formats, rules TIE201-TIE207): real files written with the `gguf` package's own writer, from
tiny checkpoints saved by transformers where a source is involved.

- The header reader agrees with `gguf.GGUFReader` on every tensor (name, type, shape, offset, size), and its copy
  of ggml's type sizes is the package's.
- Each loader rule of llama.cpp (read from its sources: tools/llamacpp_table.py) gives its verdict: a required head
  absent (TIE201), a head where none is loaded (TIE202), an architecture llama.cpp does not load (TIE203).
- With --against, a head trained apart from the embedding and lost in conversion (TIE204), or replaced by the
  embedding (TIE205, quantised), and a source that does not fit (TIE207); a faithful conversion is clean.
- GGUF LoRA adapters with a head for a tied base (TIE206).
- Malformed or truncated files: one line on stderr, exit 2; a 70B-sized (sparse) file: only its header is read.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.gguf_builders import convert, hf_tensors, write_gguf
from tieaudit import audit
from tieaudit.formats import gguf_header
from tieaudit.formats.gguf_header import read_gguf_header
from tieaudit.formats.llamacpp import head_rule

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
VOCAB, HIDDEN = 128, 64
E = RNG.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
H = RNG.standard_normal((VOCAB, HIDDEN)).astype(np.float32)


def codes(report: Any) -> list[str]:
    return [f.code for f in report.findings]


def test_the_type_sizes_are_ggml_s() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    ours = {tid: (block, size) for tid, (_, block, size) in gguf_header.GGML_TYPES.items()}
    theirs = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
    assert ours == {t: theirs[t] for t in ours}
    assert {gguf_header.GGML_TYPES[int(t)][0] for t in GGML_QUANT_SIZES} == {t.name for t in GGML_QUANT_SIZES}
    assert all(GGMLQuantizationType(t).name == n for t, (n, _, _) in gguf_header.GGML_TYPES.items())


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1"])
def test_the_header_reader_agrees_with_ggufs_own(qtype: str, tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = write_gguf(
        tmp_path / "m.gguf",
        "llama",
        {"token_embd.weight": E, "output.weight": H, "blk.0.attn_norm.weight": E[0]},
        qtypes={"token_embd.weight": qtype, "output.weight": qtype},
        extra={"llama.context_length": 128, "general.name": "tiny"},
    )
    ours = read_gguf_header(path)
    reader = GGUFReader(path)
    assert ours.string("general.architecture") == "llama" and ours.metadata["llama.context_length"] == 128
    assert {t.name for t in reader.tensors} == set(ours.tensors)
    for t in reader.tensors:
        mine = ours.tensors[t.name]
        assert (mine.type_name, mine.offset, mine.nbytes) == (t.tensor_type.name, int(t.data_offset), int(t.n_bytes))
        assert mine.dims == tuple(int(d) for d in t.shape)
    assert ours.header_bytes <= path.stat().st_size


@pytest.mark.parametrize(
    ("arch", "head", "expected"),
    [
        ("llama", False, []),  # tied: llama.cpp uses token_embd.weight
        ("llama", True, []),
        ("qwen2", False, []),
        ("phi2", False, ["TIE201"]),  # required: does not load
        ("gptneox", False, ["TIE201"]),
        ("phi2", True, []),
        ("gemma2", True, ["TIE202"]),  # always tied: an output.weight does not load
        ("gemma2", False, []),
        ("bert", True, ["TIE202"]),  # no head at all
        ("eagle3", False, []),  # optional without fallback: the draft uses its target's head
        ("no-such-arch", False, ["TIE203"]),
        (None, True, ["TIE203"]),
    ],
)
def test_the_loader_rule_decides(arch: str | None, head: bool, expected: list[str], tmp_path: Path) -> None:
    tensors = {"token_embd.weight": E, **({"output.weight": H} if head else {})}
    report = audit(write_gguf(tmp_path / "m.gguf", arch, tensors))
    assert codes(report) == expected
    assert report.exit_code == (1 if expected else 0)
    assert report.stats.tensor_bytes_read == 0
    [group] = report.groups
    assert group.source == "token_embd.weight" and group.targets == ("output.weight",)


def test_the_table_is_llamacpps_and_covers_the_common_architectures() -> None:
    rules = {a: head_rule(a) for a in ("llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2", "t5", "gemma2", "phi2")}
    assert {a: r.rule for a, r in rules.items() if r} == {
        "llama": "fallback",
        "qwen2": "fallback",
        "qwen3": "fallback",
        "gemma3": "fallback",
        "phi3": "fallback",
        "gpt2": "fallback",
        "t5": "fallback",
        "gemma2": "embedding",
        "phi2": "required",
    }
    sys.path.insert(0, str(ROOT / "tools"))
    import llamacpp_table

    fallback = """
        output = create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), {n_embd, n_vocab}, TENSOR_NOT_REQUIRED);
        // if output is NULL, init from the input tok embed
        if (output == NULL) {
            output = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, TENSOR_DUPLICATED);
        }"""
    required = 'output = create_tensor(tn(LLM_TENSOR_OUTPUT, "weight"), {n_embd, n_vocab}, 0);'
    dead = required + fallback.split("// if", 1)[1].split("\n", 1)[1]  # exaone-moe: a fallback that never runs
    tied = 'output = create_tensor(tn(LLM_TENSOR_TOKEN_EMBD, "weight"), {n_embd, n_vocab}, TENSOR_DUPLICATED);'
    commented = "// " + required + "\n" + tied  # plm
    assert [llamacpp_table.classify(b)[0] for b in (fallback, required, dead, tied, commented, "")] == [
        "fallback",
        "required",
        "required",
        "embedding",
        "embedding",
        "absent",
    ]


# -- against the source ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llamas saved by transformers: untied with a head trained apart, and tied."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf-sources")
    out = {}
    for name, tied in (("untied", False), ("tied", True)):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
        LlamaForCausalLM(config).save_pretrained(root / name)
        out[name] = root / name
    return out


EMB = "model.embed_tokens.weight"


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_a_faithful_conversion_is_clean(qtype: str, sources: dict[str, Path], tmp_path: Path) -> None:
    for name, src in sources.items():
        out = convert(src, tmp_path / f"{name}.gguf", qtype, embedding=EMB)
        report = audit(out, against=src)
        assert codes(report) == [], (name, report.findings)
        [emb, head] = report.comparisons
        assert emb.rel_diff is not None and emb.rel_diff < 0.2
        assert head.rel_diff is not None and head.rel_diff < 0.2
        assert ("output.weight" in read_gguf_header(out).tensors) == (name == "untied")
        assert report.stats.tensor_bytes_read > 0


def test_a_trained_head_lost_in_conversion(sources: dict[str, Path], tmp_path: Path) -> None:
    """The untied model saved again under a tied config: save_pretrained drops lm_head.weight, the converter writes
    no output.weight, llama.cpp runs the embedding as the head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sources["untied"])
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "retied")
    assert "lm_head.weight" not in hf_tensors(tmp_path / "retied")
    out = convert(tmp_path / "retied", tmp_path / "retied.gguf", "Q8_0", embedding=EMB)
    report = audit(out, against=sources["untied"])
    assert codes(report) == ["TIE204"]
    [finding] = report.findings
    assert finding.evidence["head_vs_embedding"] > 0.5 and "convert_hf_to_gguf.py" in (finding.fix.command or "")
    assert codes(audit(out, against=tmp_path / "retied")) == []  # against what it was converted from: faithful


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_a_head_replaced_by_the_embedding(qtype: str, sources: dict[str, Path], tmp_path: Path) -> None:
    t = hf_tensors(sources["untied"])
    out = write_gguf(
        tmp_path / "m.gguf",
        "llama",
        {"token_embd.weight": t[EMB], "output.weight": t[EMB] * 3.0},  # scaled: the distance is scale-free
        qtypes={"output.weight": qtype},
    )
    report = audit(out, against=sources["untied"])
    assert codes(report) == ["TIE205"]
    ev = report.findings[0].evidence
    assert ev["gguf_head_vs_embedding"] < ev["gguf_head_vs_head"]


def test_the_gemma2_converter_drops_a_trained_head(tmp_path: Path) -> None:
    """Gemma 2's converter drops lm_head.weight always; its llama.cpp loader always ties: the head cannot be carried."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    )
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "src")
    assert "lm_head.weight" in hf_tensors(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "g.gguf", "F16", embedding=EMB)
    report = audit(out, against=tmp_path / "src")
    assert codes(report) == ["TIE204"]
    assert report.findings[0].fix.command is None and "always ties" in (report.findings[0].fix.description or "")


def test_a_source_that_does_not_fit(sources: dict[str, Path], tmp_path: Path) -> None:
    out = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": E})  # 128 x 64, the source 256 x 64
    report = audit(out, against=sources["untied"])
    assert codes(report) == ["TIE207"] and report.exit_code == 1


# -- adapters --------------------------------------------------------------------------------------------------------


def _lora(path: Path, arch: str, targets: list[str]) -> Path:
    tensors: dict[str, np.ndarray] = {}
    for t in targets:
        tensors[f"{t}.lora_a"] = RNG.standard_normal((4, HIDDEN)).astype(np.float32)
        tensors[f"{t}.lora_b"] = RNG.standard_normal((VOCAB, 4)).astype(np.float32)
    return write_gguf(
        path, arch, tensors, general_type="adapter", extra={"adapter.type": "lora", "adapter.lora.alpha": 8.0}
    )


def test_a_lora_on_the_head_of_a_tied_base(tmp_path: Path) -> None:
    lora = _lora(tmp_path / "lora.gguf", "llama", ["output.weight", "blk.0.attn_q.weight"])
    tied = write_gguf(tmp_path / "tied.gguf", "llama", {"token_embd.weight": E})
    untied = write_gguf(tmp_path / "untied.gguf", "llama", {"token_embd.weight": E, "output.weight": H})
    assert [(f.code, f.severity.value) for f in audit(lora, base=tied).findings] == [("TIE206", "error")]
    assert codes(audit(lora, base=untied)) == []
    assert [(f.code, f.severity.value) for f in audit(lora).findings] == [("TIE206", "warning")]
    gemma = _lora(tmp_path / "g.gguf", "gemma2", ["output.weight"])
    assert [(f.code, f.severity.value) for f in audit(gemma).findings] == [("TIE206", "error")]
    assert codes(audit(_lora(tmp_path / "q.gguf", "llama", ["blk.0.attn_q.weight"]))) == []


# -- bad input -------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "tieaudit"
    return subprocess.run([str(exe), "check", *args], capture_output=True, text=True, timeout=120)


def _corrupt(tmp_path: Path, how: str) -> Path:
    good = write_gguf(tmp_path / "good.gguf", "llama", {"token_embd.weight": E, "output.weight": H})
    raw = bytearray(good.read_bytes())
    header = read_gguf_header(good)
    bad = tmp_path / f"{how}.gguf"
    if how == "truncated-data":
        raw = raw[: header.tensors["output.weight"].offset + 10]
    elif how == "truncated-header":
        raw = raw[:40]
    elif how == "magic-only":
        raw = raw[:4]
    elif how == "version":
        raw[4:8] = struct.pack("<I", 7)
    elif how == "huge-counts":
        raw[8:16] = struct.pack("<Q", 10**12)
    elif how == "bad-type":
        key_at = raw.index(b"general.architecture")
        raw[key_at + 20 : key_at + 24] = struct.pack("<I", 99)
    elif how == "bad-utf8":
        key_at = raw.index(b"general.architecture")
        raw[key_at] = 0xFF
    bad.write_bytes(bytes(raw))
    return bad


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("truncated-data", "runs past the end of the file"),
        ("truncated-header", "truncated"),
        ("magic-only", "truncated"),
        ("version", "version 7"),
        ("huge-counts", "corrupt"),
        ("bad-type", "unknown value type 99"),
        ("bad-utf8", "not UTF-8"),
    ],
)
def test_a_broken_file_is_one_line_and_exit_2(how: str, says: str, tmp_path: Path) -> None:
    proc = _cli(str(_corrupt(tmp_path, how)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_duplicates_and_misalignment_are_refused(tmp_path: Path) -> None:
    from tieaudit.errors import InputError

    good = write_gguf(tmp_path / "g.gguf", "llama", {"aaaa": E, "bbbb": H})
    raw = good.read_bytes()
    (tmp_path / "dup.gguf").write_bytes(raw.replace(b"bbbb", b"aaaa"))
    with pytest.raises(InputError, match="duplicate tensor name"):
        read_gguf_header(tmp_path / "dup.gguf")
    info = read_gguf_header(good).tensors["bbbb"]
    rel = info.offset - read_gguf_header(good).data_start
    at = raw.index(b"bbbb") + 4 + 4 + 2 * 8 + 4  # name, dimension count, 2 dimensions, type: then the offset
    assert raw[at : at + 8] == struct.pack("<Q", rel)
    (tmp_path / "odd.gguf").write_bytes(raw[:at] + struct.pack("<Q", rel + 4) + raw[at + 8 :])
    with pytest.raises(InputError, match="not a multiple of the alignment"):
        read_gguf_header(tmp_path / "odd.gguf")


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\0" * 64)
    proc = _cli(str(tmp_path / "x.bin"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_against_needs_a_gguf_file(tmp_path: Path) -> None:
    proc = _cli(str(ROOT / "fixtures" / "demo" / "llama-clean"), "--against", str(ROOT / "fixtures" / "demo"))
    assert proc.returncode == 2 and "--against is for GGUF files" in proc.stderr


# -- scale ----------------------------------------------------------------------------------------------------------


LAYER_70B = {  # Llama-3-70B: (rows, columns) of each layer's matrices
    "attn_q": (8192, 8192),
    "attn_k": (1024, 8192),
    "attn_v": (1024, 8192),
    "attn_output": (8192, 8192),
    "ffn_gate": (28672, 8192),
    "ffn_up": (28672, 8192),
    "ffn_down": (8192, 28672),
}


def test_a_70b_sized_file_is_judged_from_its_header(tmp_path: Path) -> None:
    """A Llama-3-70B-shaped layout (80 layers, 128256 x 8192 embedding, Q4_K), written sparse: only the header is
    read, whatever the size of the data."""
    from gguf import GGMLQuantizationType, GGUFWriter

    path = tmp_path / "big.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(128256)])
    shapes = {"token_embd.weight": (128256, 8192), "output.weight": (128256, 8192)}
    for i in range(80):
        for name, shape in LAYER_70B.items():
            shapes[f"blk.{i}.{name}.weight"] = shape
    for name, (rows, cols) in shapes.items():
        writer.add_tensor_info(
            name,
            (rows, cols // 256 * 144),
            np.dtype(np.uint8),
            rows * cols // 256 * 144,
            raw_dtype=GGMLQuantizationType.Q4_K,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_end = path.stat().st_size
    pad = gguf_header.DEFAULT_ALIGNMENT
    data = sum(-(-(r * c // 256 * 144) // pad) * pad for r, c in shapes.values())
    os.truncate(path, -(-header_end // pad) * pad + data)  # sparse: the data reads as zeros, and is never read
    assert path.stat().st_size > 35 * 2**30  # 70.6 billion weights at 4.5 bits
    report = audit(path)
    assert codes(report) == [] and report.stats.tensor_bytes_read == 0
    assert report.stats.header_bytes_read < header_end + 2**16
    proc = _cli(str(path), "--select", "TIE2", "-f", "json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["stats"]["tensor_bytes_read"] == 0


# -- fuzzing ---------------------------------------------------------------------------------------------------------


def _fuzz_seed() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_gguf(
            Path(tmp) / "seed.gguf",
            "llama",
            {"token_embd.weight": E[:8, :32], "output.weight": H[:8, :32]},
            qtypes={"output.weight": "Q8_0"},
            extra={"general.name": "seed", "llama.context_length": 64},
        )
        return path.read_bytes()


SEED_FILE = _fuzz_seed()


def _mutations() -> Any:
    from hypothesis import strategies as st

    flips = st.lists(st.tuples(st.integers(0, len(SEED_FILE) - 1), st.integers(0, 255)), max_size=8)
    cut = st.integers(0, len(SEED_FILE))
    return st.tuples(flips, cut)


def test_fuzz_no_mutation_escapes_as_anything_but_an_input_error(tmp_path: Path) -> None:
    """Byte flips and truncations of a real file: the header reader accepts (with every tensor inside the file and no
    overlap) or raises InputError, never anything else."""
    from hypothesis import HealthCheck, given, settings

    from tieaudit.errors import InputError

    path = tmp_path / "f.gguf"

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_mutations())
    def run(case: Any) -> None:
        flips, cut = case
        data = bytearray(SEED_FILE)
        for at, value in flips:
            data[at] = value
        path.write_bytes(bytes(data[:cut]))
        try:
            header = read_gguf_header(path)
        except InputError:
            return
        spans = sorted((t.offset, t.offset + t.nbytes) for t in header.tensors.values())
        assert all(0 <= a <= b <= header.file_size for a, b in spans)
        assert all(b <= c for (_, b), (c, _) in itertools.pairwise(spans))

    run()


# -- a head that is not the source's -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_another_head_is_found_beyond_quantisation(qtype: str, sources: dict[str, Path], tmp_path: Path) -> None:
    t = hf_tensors(sources["untied"])
    other = np.random.default_rng(7).standard_normal(t["lm_head.weight"].shape).astype(np.float32) * 0.02
    out = write_gguf(
        tmp_path / "m.gguf",
        "llama",
        {"token_embd.weight": t[EMB], "output.weight": other},
        qtypes={"token_embd.weight": qtype, "output.weight": qtype},
    )
    report = audit(out, against=sources["untied"])
    assert codes(report) == ["TIE208"]
    ev = report.findings[0].evidence
    assert ev["gguf_head_vs_head"] > 2 * ev["quantisation_floor"]


def _k_quant_source(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """An untied Llama (hidden 256, a Q4_K block) whose embedding and head are exactly representable in Q4_K: random
    blocks, dequantised by the gguf package. Returns the checkpoint and each tensor's Q4_K bytes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.numpy import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    rng = np.random.default_rng(3)
    raw = {}
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    for name in (EMB, "lm_head.weight"):
        blocks = rng.integers(0, 256, size=(64, 144), dtype=np.uint8)
        blocks[:, 0:4] = np.frombuffer(np.array([0.01, 0.001], np.float16).tobytes(), np.uint8)  # d, dmin
        raw[name] = blocks
        state[name] = dequantize(blocks, GGMLQuantizationType.Q4_K).astype(np.float32)
    save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path / "src", raw


def _write_raw(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for name, blocks in tensors.items():
        writer.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_k_quant_head_is_judged_against_the_files_own_embedding(tmp_path: Path) -> None:
    """gguf has no Q4_K quantiser: the file's own embedding, in the same type, calibrates the head's distance."""
    src, raw = _k_quant_source(tmp_path)
    same = _write_raw(tmp_path / "same.gguf", {"token_embd.weight": raw[EMB], "output.weight": raw["lm_head.weight"]})
    assert codes(audit(same, against=src)) == []
    other = np.random.default_rng(9).integers(0, 256, size=(64, 144), dtype=np.uint8)
    other[:, 0:4] = raw["lm_head.weight"][:, 0:4]
    swapped = _write_raw(tmp_path / "other.gguf", {"token_embd.weight": raw[EMB], "output.weight": other})
    assert codes(audit(swapped, against=src)) == ["TIE208"]
