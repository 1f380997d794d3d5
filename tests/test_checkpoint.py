"""Tests of tieaudit.checkpoint on real tiny checkpoints written by transformers, peft, torch and safetensors."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tieaudit.checkpoint import Checkpoint, open_checkpoint, parse_header, read_config
from tieaudit.checkpoint.config import line_map
from tieaudit.checkpoint.types import IndexMismatch
from tieaudit.errors import InputError, NothingToAudit

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LAYER_NORM = "model.layers.0.input_layernorm.weight"


# --------------------------------------------------------------------------- fixtures


def _tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny tied Llama with deterministic weights."""
    from transformers import LlamaForCausalLM

    from fixtures.builders import ARCHS

    torch.manual_seed(0)
    model = LlamaForCausalLM(ARCHS["llama"].make_config())
    with torch.no_grad():  # norms are all ones at init; make every tensor distinctive
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    return model.to(dtype)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _tiny_model()


@pytest.fixture(scope="module")
def single_dir(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_dir(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(path, max_shard_size="5KB")
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bf16")
    _tiny_model(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bin_dir(model: torch.nn.Module, single_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bin")
    shutil.copy(single_dir / "config.json", path / "config.json")
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="module")
def bin_sharded_dir(model: torch.nn.Module, single_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bin_sharded")
    shutil.copy(single_dir / "config.json", path / "config.json")
    state = model.state_dict()
    first = {k: v for k, v in state.items() if k in (EMBED, "lm_head.weight")}
    second = {k: v for k, v in state.items() if k not in first}
    shards = {"pytorch_model-00001-of-00002.bin": first, "pytorch_model-00002-of-00002.bin": second}
    weight_map = {}
    for shard, tensors in shards.items():
        torch.save(tensors, path / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("adapter")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5; not our concern here
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(_tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- layout discovery


def test_single_safetensors_layout(single_dir: Path) -> None:
    with open_checkpoint(single_dir) as ckpt:
        assert ckpt.kind == "model"
        assert ckpt.layout == "safetensors"
        assert ckpt.root == single_dir.resolve()
        assert ckpt.files == ("config.json", "model.safetensors")
        assert ckpt.weight_files == ("model.safetensors",)
        assert ckpt.index_file is None
        assert ckpt.config is not None and ckpt.config.data["tie_word_embeddings"] is True
        assert ckpt.adapter_config is None
        assert ckpt.metadata == {"model.safetensors": {"format": "pt"}}
        assert ckpt.index_mismatches == ()
        assert EMBED in ckpt.tensors and "lm_head.weight" not in ckpt.tensors  # tied: saved once
        assert all(info.storage_id is None for info in ckpt.tensors.values())


def test_sharded_safetensors_layout(sharded_dir: Path) -> None:
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shards = tuple(sorted(set(index["weight_map"].values())))
    assert len(shards) > 1
    with open_checkpoint(sharded_dir) as ckpt:
        assert ckpt.layout == "safetensors-sharded"
        assert ckpt.index_file == "model.safetensors.index.json"
        assert ckpt.weight_files == shards
        assert ckpt.files == tuple(sorted(("config.json", "model.safetensors.index.json", *shards)))
        assert ckpt.index_mismatches == ()
        assert {name: info.file for name, info in ckpt.tensors.items()} == index["weight_map"]
        assert set(ckpt.metadata) == set(shards)


def test_bin_layout_shares_storage_of_tied_weights(bin_dir: Path, model: torch.nn.Module) -> None:
    with open_checkpoint(bin_dir) as ckpt:
        assert (ckpt.kind, ckpt.layout) == ("model", "bin")
        assert ckpt.files == ("config.json", "pytorch_model.bin")
        assert ckpt.metadata == {"pytorch_model.bin": {}}
        assert set(ckpt.tensors) == set(model.state_dict())
        embed, head = ckpt.tensors[EMBED], ckpt.tensors["lm_head.weight"]
        assert embed.storage_id is not None and embed.storage_id == head.storage_id
        others = [info.storage_id for name, info in ckpt.tensors.items() if name not in (EMBED, "lm_head.weight")]
        assert len(set(others)) == len(others) and embed.storage_id not in others
        assert (embed.dtype, embed.shape, embed.nbytes) == ("F32", (64, 16), 64 * 16 * 4)


def test_sharded_bin_layout(bin_sharded_dir: Path) -> None:
    with open_checkpoint(bin_sharded_dir) as ckpt:
        assert ckpt.layout == "bin"
        assert ckpt.index_file == "pytorch_model.bin.index.json"
        assert ckpt.weight_files == ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
        assert ckpt.index_mismatches == ()
        assert ckpt.tensors[EMBED].storage_id == ckpt.tensors["lm_head.weight"].storage_id
        assert ckpt.tensors[EMBED].file == "pytorch_model-00001-of-00002.bin"


def test_adapter_layout(adapter_dir: Path) -> None:
    with open_checkpoint(adapter_dir) as ckpt:
        assert (ckpt.kind, ckpt.layout) == ("adapter", "safetensors")
        assert ckpt.files == ("adapter_config.json", "adapter_model.safetensors")
        assert ckpt.config is None
        assert ckpt.adapter_config is not None and ckpt.adapter_config.data["r"] == 2
        assert all("lora_" in name for name in ckpt.tensors)


def test_adapter_without_weights_is_nothing_to_audit(adapter_dir: Path, tmp_path: Path) -> None:
    path = _copy(adapter_dir, tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(NothingToAudit, match=r"adapter_config\.json"):
        open_checkpoint(path)


def test_non_standard_safetensors_names(single_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "odd"
    path.mkdir()
    shutil.copy(single_dir / "model.safetensors", path / "weights.safetensors")
    with open_checkpoint(path) as ckpt:
        assert (ckpt.layout, ckpt.weight_files, ckpt.config) == ("safetensors", ("weights.safetensors",), None)
    shutil.copy(single_dir / "model.safetensors", path / "more.safetensors")
    with pytest.raises(InputError, match="stored in both"):  # no index: a loader could pick either copy
        open_checkpoint(path)


def test_empty_dir_is_nothing_to_audit(tmp_path: Path) -> None:
    with pytest.raises(NothingToAudit) as info:
        open_checkpoint(tmp_path)
    assert info.value.message == (
        f"nothing auditable at {tmp_path}: no config.json and no *.safetensors / pytorch_model*.bin weights"
    )
    assert info.value.exit_code == 3


def test_config_without_weights_is_nothing_to_audit(single_dir: Path, tmp_path: Path) -> None:
    shutil.copy(single_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(NothingToAudit, match=r"config\.json found .* but no weights"):
        open_checkpoint(tmp_path)


def test_missing_path_and_file_path(single_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as info:
        open_checkpoint(missing)
    assert info.value.message == f"path does not exist: {missing}"
    weights = single_dir / "model.safetensors"
    with pytest.raises(InputError) as info:
        open_checkpoint(str(weights))
    assert info.value.message == f"expected a checkpoint directory, got a file: {weights}"


# --------------------------------------------------------------------------- headers and reads


@pytest.mark.parametrize("fixture", ["single_dir", "sharded_dir", "bf16_dir", "adapter_dir"])
def test_header_matches_safetensors(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    with open_checkpoint(path) as ckpt:
        for rel in ckpt.weight_files:
            tensors, metadata, header_bytes = parse_header(path / rel, rel)
            with safe_open(path / rel, "pt") as reference:
                assert set(tensors) == set(reference.keys())
                assert metadata == (reference.metadata() or {})
                for name, info in tensors.items():
                    view = reference.get_slice(name)
                    assert (info.shape, info.dtype, info.file) == (tuple(view.get_shape()), view.get_dtype(), rel)
                    assert ckpt.tensors[name] == info
            n = struct.unpack("<Q", (path / rel).read_bytes()[:8])[0]
            assert header_bytes == 8 + n


@pytest.mark.parametrize("fixture", ["single_dir", "sharded_dir", "bf16_dir"])
def test_read_rows_matches_load_file(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    with open_checkpoint(path) as ckpt:
        for rel in ckpt.weight_files:
            for name, expected in load_file(path / rel).items():
                rows = expected.shape[0]
                full = ckpt.read_rows(name, 0, rows)
                assert full.dtype == expected.dtype and torch.equal(full, expected)
                part = ckpt.read_rows(name, 1, rows - 1)
                assert torch.equal(part, expected[1 : rows - 1])
    if fixture == "bf16_dir":
        assert full.dtype == torch.bfloat16


def test_read_rows_returns_a_copy(single_dir: Path) -> None:
    with open_checkpoint(single_dir) as ckpt:
        first = ckpt.read_rows(EMBED, 0, 4)
        first.zero_()
        assert not torch.equal(ckpt.read_rows(EMBED, 0, 4), first)


def test_read_rows_of_bin_matches_state_dict(bin_dir: Path, model: torch.nn.Module) -> None:
    state = model.state_dict()
    with open_checkpoint(bin_dir) as ckpt:
        for name, expected in state.items():
            assert torch.equal(ckpt.read_rows(name, 0, expected.shape[0]), expected)
        part = ckpt.read_rows("lm_head.weight", 3, 7)
        assert torch.equal(part, state[EMBED][3:7]) and part.is_contiguous()
        part.zero_()  # a copy: the mmapped tensor is untouched
        assert torch.equal(ckpt.read_rows(EMBED, 3, 7), state[EMBED][3:7])
        assert ckpt.stats.tensor_bytes == sum(t.nbytes for t in state.values()) + 2 * 4 * 16 * 4


def test_scalar_and_empty_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "u16": torch.arange(6).to(torch.uint16)}
    save_file(tensors, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ckpt:
        scalar = ckpt.read_rows("scalar", 0, 1)
        assert scalar.shape == () and scalar.item() == 3.5
        assert [start for start, _ in ckpt.iter_rows("scalar")] == [0]
        assert ckpt.read_rows("empty", 0, 0).shape == (0, 4)
        assert list(ckpt.iter_rows("empty")) == []
        u16 = ckpt.read_rows("u16", 2, 5)
        assert u16.dtype == torch.uint16 and u16.to(torch.int64).tolist() == [2, 3, 4]
        with pytest.raises(ValueError):
            ckpt.read_rows("u16", 4, 7)
        assert ckpt.stats.tensor_bytes == 4 + 3 * 2 + 4  # scalar, u16 rows, scalar again via iter_rows


def test_iter_rows_respects_chunk_bound(single_dir: Path) -> None:
    expected = load_file(single_dir / "model.safetensors")[EMBED]  # 64 rows of 64 bytes
    with open_checkpoint(single_dir) as ckpt:
        chunks = list(ckpt.iter_rows(EMBED, max_chunk_bytes=200))
        assert [start for start, _ in chunks] == list(range(0, 64, 3))
        assert all(chunk.nbytes <= 200 for _, chunk in chunks)
        assert torch.equal(torch.cat([chunk for _, chunk in chunks]), expected)
        tiny = list(ckpt.iter_rows(EMBED, max_chunk_bytes=10))  # smaller than a row: one row each
        assert len(tiny) == 64 and all(chunk.shape == (1, 16) for _, chunk in tiny)


def test_stats_count_exactly_the_bytes_requested(single_dir: Path) -> None:
    text = (single_dir / "config.json").read_bytes()
    n = struct.unpack("<Q", (single_dir / "model.safetensors").read_bytes()[:8])[0]
    with open_checkpoint(single_dir) as ckpt:
        assert ckpt.stats.tensor_bytes == 0
        assert ckpt.stats.header_bytes == len(text) + 8 + n
        ckpt.read_rows(EMBED, 2, 5)
        assert ckpt.stats.tensor_bytes == 3 * 16 * 4
        ckpt.read_rows(NORM, 0, 16)
        assert ckpt.stats.tensor_bytes == 3 * 16 * 4 + 16 * 4


def test_close_releases_files(single_dir: Path) -> None:
    ckpt = open_checkpoint(single_dir)
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ckpt.read_rows(EMBED, 0, 1)


# --------------------------------------------------------------------------- config line map


def test_config_line_map_on_real_config(single_dir: Path) -> None:
    config = read_config(single_dir, "config.json")
    lines = (single_dir / "config.json").read_text().splitlines()

    def line_containing(fragment: str) -> int:
        return next(i for i, text in enumerate(lines, 1) if fragment in text)

    assert config.line_of("/tie_word_embeddings") == line_containing('"tie_word_embeddings"')
    assert config.line_of("/architectures/0") == line_containing('"LlamaForCausalLM"')
    assert config.line_of("/rope_parameters/rope_theta") == line_containing('"rope_theta"')
    assert config.line_of("/missing") is None
    assert config.data["vocab_size"] == 64


def test_line_map_escapes_and_nesting() -> None:
    text = '{\n "a/b": 1,\n "t~": {"x": [\n  {"y": "}{,\\""},\n  2\n ]},\n "": [[], {}]\n}'
    assert json.loads(text)  # valid JSON
    lines = line_map(text)
    assert lines == {
        "": 1,
        "/a~1b": 2,
        "/t~0": 3,
        "/t~0/x": 3,
        "/t~0/x/0": 4,
        "/t~0/x/0/y": 4,
        "/t~0/x/1": 5,
        "/": 7,
        "//0": 7,
        "//1": 7,
    }


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{\n  "a": 1,\n  "b": \n}', r"config\.json: invalid JSON at line 4 column 1: Expecting value"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "config.json"),
    ],
)
def test_bad_config_is_input_error(content: bytes, match: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_config(tmp_path, "config.json")


# --------------------------------------------------------------------------- corrupt safetensors


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: bytes, data: bytes, n: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def _edit(change: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    """A corruption that edits the decoded header and re-packs it with the original data."""

    def corrupt(raw: bytes) -> bytes:
        header, data = _split(raw)
        change(header)
        return _pack(json.dumps(header).encode(), data)

    return corrupt


def _set(name: str, key: str, value: object) -> Callable[[bytes], bytes]:
    return _edit(lambda h: h[name].__setitem__(key, value))


def _duplicate_key(raw: bytes) -> bytes:
    header, data = _split(raw)
    text = json.dumps(header)
    return _pack((text[:-1] + f', "{NORM}": ' + json.dumps(header[NORM]) + "}").encode(), data)


def _overlap(raw: bytes) -> bytes:
    header, data = _split(raw)
    header[NORM]["data_offsets"] = header[LAYER_NORM]["data_offsets"]  # same shape and dtype: sizes agree
    return _pack(json.dumps(header).encode(), data)


def _replace_in_header(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def corrupt(raw: bytes) -> bytes:
        n = struct.unpack("<Q", raw[:8])[0]
        header = raw[8 : 8 + n].replace(old, new, 1)
        assert len(header) == n
        return raw[:8] + header + raw[8 + n :]

    return corrupt


CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "shorter_than_8": (lambda raw: raw[:5], "too short"),
    "zero_length": (lambda raw: b"\0" * 8 + raw[8:], "length is 0"),
    "length_past_end": (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "larger than the rest"),
    "absurd_length": (lambda raw: struct.pack("<Q", 2**40) + raw[8:], "absurd"),
    "not_utf8": (_replace_in_header(NORM.encode(), NORM.encode()[:-1] + b"\xff"), "UTF-8"),
    "not_json": (_replace_in_header(b"{", b"x"), "not valid JSON"),
    "not_object": (lambda raw: _pack(b"[]", _split(raw)[1]), "not a JSON object"),
    "too_deep": (lambda raw: _pack(b"[" * 100_000 + b"]" * 100_000, b""), "too deeply"),
    "duplicate_key": (_duplicate_key, "duplicate key"),
    "metadata_not_str": (_edit(lambda h: h.__setitem__("__metadata__", {"format": 1})), "__metadata__"),
    "metadata_not_object": (_edit(lambda h: h.__setitem__("__metadata__", "pt")), "__metadata__"),
    "entry_not_object": (_edit(lambda h: h.__setitem__(NORM, [1, 2])), "not an object"),
    "missing_dtype": (_edit(lambda h: h[NORM].pop("dtype")), "no 'dtype'"),
    "unknown_dtype": (_set(NORM, "dtype", "F128"), "unsupported dtype"),
    "negative_dim": (_set(NORM, "shape", [-16]), "non-negative integers"),
    "float_dim": (_set(NORM, "shape", [16.0]), "non-negative integers"),
    "shape_not_list": (_set(NORM, "shape", 16), "non-negative integers"),
    "offsets_reversed": (_set(NORM, "data_offsets", [64, 0]), "0 <= begin <= end"),
    "offsets_negative": (_set(NORM, "data_offsets", [-64, 0]), "0 <= begin <= end"),
    "offsets_not_pair": (_set(NORM, "data_offsets", [0]), "0 <= begin <= end"),
    "size_mismatch": (_set(NORM, "shape", [8]), "needs 32 bytes"),
    "data_past_end": (lambda raw: raw[:-4], "past the end of the file"),
    "overlap": (_overlap, "overlap"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_safetensors_is_input_error(case: str, single_dir: Path, tmp_path: Path) -> None:
    corrupt, match = CORRUPTIONS[case]
    path = _copy(single_dir, tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(InputError) as info:
        open_checkpoint(path)
    assert "model.safetensors" in info.value.message and match in info.value.message
    assert "\n" not in info.value.message
    with pytest.raises(InputError) as info:
        parse_header(weights)
    assert str(weights) in info.value.message


# --------------------------------------------------------------------------- unsafe inputs


class _Payload:
    """Pickles as a call to open(marker, "w"): loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_pickle_is_refused(legacy: bool, single_dir: Path, tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "evil"
    path.mkdir()
    marker = tmp_path / "pwned"
    payload = {"model.embed_tokens.weight": torch.zeros(2), "x": _Payload(marker)}
    if legacy:
        (path / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path / "pytorch_model.bin")
    with pytest.raises(InputError) as info:
        open_checkpoint(path)
    assert info.value.message.startswith("refusing pytorch_model.bin: it is not a plain tensor checkpoint")
    assert "\n" not in info.value.message and len(info.value.message) < 300  # torch's essay trimmed to a reason
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="expected a dict of name -> tensor"):
        open_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(InputError, match=r"pytorch_model\.bin"):
        open_checkpoint(tmp_path)


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            open_checkpoint(tmp_path)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "open_checkpoint hung on a FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], InputError)
    assert "model.safetensors" in str(outcome[0]) and "not a regular file" in str(outcome[0])


def test_symlink_escaping_the_directory_is_refused(single_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "model.safetensors").symlink_to(single_dir / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.safetensors is a symlink to .* outside the checkpoint directory"):
        open_checkpoint(path)


def test_symlinks_inside_and_hf_cache_blobs_are_followed(single_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models--tiny--llama"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(single_dir / name, repo / "blobs" / f"blob-{name}")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", f"blob-{name}"))
    with open_checkpoint(snapshot) as ckpt:
        assert ckpt.layout == "safetensors" and EMBED in ckpt.tensors


def test_index_naming_a_missing_shard(sharded_dir: Path, tmp_path: Path) -> None:
    path = _copy(sharded_dir, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(InputError) as info:
        open_checkpoint(path)
    assert info.value.message == f"model.safetensors.index.json names shard {shard.name}, which does not exist"


@pytest.mark.parametrize(
    ("weight_map", "match"),
    [
        ({EMBED: "../model.safetensors"}, "outside the checkpoint directory"),
        ({EMBED: "/etc/passwd"}, "outside the checkpoint directory"),
        ({EMBED: 3}, "not a string"),
        ([], '"weight_map" object'),
        ({}, "weight_map is empty"),
    ],
)
def test_bad_index_is_input_error(weight_map: object, match: str, sharded_dir: Path, tmp_path: Path) -> None:
    path = _copy(sharded_dir, tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match=match):
        open_checkpoint(path)


def test_index_mismatches(sharded_dir: Path, tmp_path: Path) -> None:
    path = _copy(sharded_dir, tmp_path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = index["weight_map"]
    real_norm_shard = weight_map[NORM]
    other_shard = next(s for s in sorted(set(weight_map.values())) if s != real_norm_shard)
    weight_map["lm_head.weight"] = other_shard  # listed, but stored nowhere
    weight_map[NORM] = other_shard  # listed in the wrong shard
    del weight_map[LAYER_NORM]  # stored, but not listed
    index_path.write_text(json.dumps(index))
    with open_checkpoint(path) as ckpt:
        assert ckpt.index_mismatches == (
            IndexMismatch("lm_head.weight", other_shard, None),
            IndexMismatch(LAYER_NORM, None, ckpt.tensors[LAYER_NORM].file),
            IndexMismatch(NORM, other_shard, real_norm_shard),
        )
        assert ckpt.tensors[NORM].file == real_norm_shard  # what the shards hold, not what the index says
        assert isinstance(ckpt, Checkpoint)
