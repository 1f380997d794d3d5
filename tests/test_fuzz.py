"""Property-based fuzzing of the parsers that read untrusted bytes: the safetensors header, shard indexes and JSON
configs. Whatever the input, only `InputError` (the documented exit-2 error) may escape, and whatever is accepted
satisfies the format's invariants. The example budget is bounded for CI; `fuzz/fuzz_safetensors_header.py` is
an atheris target for long runs by hand."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tieaudit.checkpoint.config import line_map, read_config
from tieaudit.checkpoint.layout import _read_index
from tieaudit.checkpoint.safetensors_header import read_header_fd
from tieaudit.checkpoint.types import DTYPE_SIZES, ReadStats
from tieaudit.errors import InputError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("fuzz")
    os.write(fd, data)
    return fd


def _parse(data: bytes) -> object:
    fd = _memfd(data)
    try:
        return read_header_fd(fd, "fuzz.safetensors")
    except InputError:
        return None
    finally:
        os.close(fd)


def _check_invariants(header: object, size: int) -> None:
    """An accepted header: every tensor's bytes agree with dtype x shape, and the regions tile the data exactly."""
    data_start = header.data_start  # type: ignore[attr-defined]
    regions = []
    for name, info in header.tensors.items():  # type: ignore[attr-defined]
        begin, end = header.offsets[name]  # type: ignore[attr-defined]
        assert end - begin == info.nbytes == math.prod(info.shape) * DTYPE_SIZES[info.dtype]
        regions.append((begin, end))
    cursor = 0
    for begin, end in sorted(regions):
        assert begin == cursor
        cursor = end
    assert data_start + cursor == size


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    header = _parse(data)
    if header is not None:
        _check_invariants(header, len(data))


_dtype = st.sampled_from([*DTYPE_SIZES, "F128", "", "f32"]) | st.integers() | st.none()
_dim = st.integers(min_value=-2, max_value=2**64) | st.sampled_from([0, 1, 2, 3, 4]) | st.floats() | st.text(max_size=2)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": _dtype,
        "shape": st.lists(_dim, max_size=4) | st.integers(),
        "data_offsets": st.lists(st.integers(min_value=-8, max_value=2**65), max_size=3),
    },
)
_metadata = st.dictionaries(st.text(max_size=4), st.text(max_size=4) | st.integers(), max_size=2) | st.text(max_size=3)


@st.composite
def _files(draw: st.DrawFn) -> bytes:
    """Structurally plausible files: a JSON header of mutated entries, a declared length that may lie, data that
    may be short or long."""
    header: dict[str, object] = draw(st.dictionaries(st.text(max_size=6), _entry, max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(_metadata)
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text += b" " * (-len(text) % 8)
    n = (
        draw(st.sampled_from([len(text), len(text) + 1, max(0, len(text) - 1), 0, 2**63]))
        if draw(st.booleans())
        else len(text)
    )
    data = b"\0" * draw(st.integers(min_value=0, max_value=256))
    return struct.pack("<Q", n) + text + data


@FUZZ
@given(_files())
def test_structured_headers(data: bytes) -> None:
    header = _parse(data)
    if header is not None:
        _check_invariants(header, len(data))


@st.composite
def _valid_files(draw: st.DrawFn) -> bytes:
    """Valid files, then one byte flipped or the file cut: the parser refuses or accepts, never crashes."""
    names = draw(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4, unique=True))
    header, cursor = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    text = json.dumps(header).encode()
    raw = bytearray(struct.pack("<Q", len(text)) + text + b"\1" * cursor)
    if draw(st.booleans()) and raw:
        at = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[at] ^= draw(st.integers(min_value=1, max_value=255))
    else:
        raw = raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    return bytes(raw)


@FUZZ
@given(_valid_files())
def test_mutated_valid_files(data: bytes) -> None:
    header = _parse(data)
    if header is not None:
        _check_invariants(header, len(data))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("index")
    (root / "a.safetensors").write_bytes(b"x")
    (root / "sub").mkdir()
    (root / "sub" / "b.safetensors").write_bytes(b"x")
    return root


@FUZZ
@given(
    st.one_of(
        _json,
        st.fixed_dictionaries(
            {
                "weight_map": st.dictionaries(
                    st.text(max_size=6),
                    st.sampled_from(
                        [
                            "a.safetensors",
                            "sub/b.safetensors",
                            "../a.safetensors",
                            "/etc/passwd",
                            "sub/../a.safetensors",
                            "missing.safetensors",
                            "",
                            "a\0b",
                        ]
                    )
                    | _json,
                    max_size=4,
                )
            }
        ),
    )
)
def test_index_parsing(shard_root: Path, value: object) -> None:
    (shard_root / "model.safetensors.index.json").write_text(json.dumps(value))
    try:
        weight_map = _read_index(shard_root, "model.safetensors.index.json", ReadStats())
    except InputError:
        return
    for shard in weight_map.values():  # accepted shards exist and are inside the directory
        resolved = (shard_root / shard).resolve()
        assert resolved.is_file() and resolved.is_relative_to(shard_root.resolve())


@FUZZ
@given(st.binary(max_size=256) | _json.map(lambda v: json.dumps(v).encode()))
def test_config_parsing(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    root = tmp_path_factory.getbasetemp() / "config-fuzz"
    root.mkdir(exist_ok=True)
    (root / "config.json").write_bytes(raw)
    try:
        config = read_config(root, "config.json")
    except InputError:
        return
    assert isinstance(config.data, dict)
    line_map(raw.decode("utf-8-sig"))  # the line map of any accepted config is computable
