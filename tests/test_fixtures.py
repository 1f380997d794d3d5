"""The fixture builders really produce the tying states they claim (measured on disk and by loading)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fixtures.builders import (
    ARCHS,
    LAYOUTS,
    LAYOUTS_EXTRA,
    VARIANTS,
    build_checkpoint,
    build_model,
    disk_name,
    load_outcome,
)

DEMO = Path(__file__).resolve().parent.parent / "fixtures" / "demo"
TIED_ARCHS = [a for a, s in ARCHS.items() if s.tied_by_default]


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """``ckpt(arch, variant, layout="safetensors")`` -> checkpoint dir, built once per session."""
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, variant: str, layout: str = "safetensors") -> Path:
        key = (arch, variant, layout)
        if key not in cache:
            cache[key] = build_checkpoint(arch, variant, layout, root / "-".join(key))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def outcome(ckpt):
    cache = {}

    def get(arch: str, variant: str, layout: str = "safetensors"):
        key = (arch, variant, layout)
        if key not in cache:
            cache[key] = load_outcome(ckpt(*key), arch)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def names():
    """arch -> {in-memory name: on-disk name} for the declared pair members."""
    out = {}
    for arch, spec in ARCHS.items():
        model = build_model(arch)
        out[arch] = {n: disk_name(model, n) for pair in spec.pairs for n in pair}
    return out


def disk_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir, whatever the layout."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(path.glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ------------------------------------------------------------------------------------------ specs


def test_registry_shape():
    assert set(ARCHS) == {"llama", "gpt2", "t5", "bart", "bert", "whisper", "gemma3", "mistral", "qwen2", "gemma2"}
    assert VARIANTS == ("clean", "diverged", "untied_missing", "both_missing", "shape_mismatch", "redundant")
    assert LAYOUTS == ("safetensors", "safetensors-sharded", "bin")
    assert LAYOUTS_EXTRA == ("bin-sharded",)
    assert [a for a, s in ARCHS.items() if not s.tied_by_default] == ["mistral"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_spec_matches_library(arch):
    spec = ARCHS[arch]
    c1, c2 = spec.make_config(), spec.make_config()
    assert c1 is not c2, "make_config must return a fresh config"
    model = build_model(arch)
    assert model.config is not c1
    assert not model.training
    assert bool(model.config.tie_word_embeddings) is spec.tied_by_default
    declared = dict(model.all_tied_weights_keys)
    if spec.tied_by_default:
        assert declared == dict(spec.pairs)
    else:  # mistral: declared by the class, inactive with the untied default config
        assert declared == {}
        assert dict(spec.pairs) == spec.model_class._tied_weights_keys
    for target, source in spec.pairs:
        same = model.get_parameter_or_buffer(target) is model.get_parameter_or_buffer(source)
        assert same is spec.tied_by_default


def test_build_model_is_seeded():
    a, b, c = build_model("llama", seed=0), build_model("llama", seed=0), build_model("llama", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------ every arch


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_clean(arch, ckpt, outcome, names):
    spec = ARCHS[arch]
    path = ckpt(arch, "clean")
    keys = set(disk_tensors(path))
    target, source = spec.head
    assert names[arch][source] in keys
    out = outcome(arch, "clean")
    assert not out.broken, out
    assert out.error is None and not out.missing_keys and not out.not_tied and not out.corrupted
    if spec.tied_by_default:
        assert config(path)["tie_word_embeddings"] is True
        assert not {names[arch][t] for t, _ in spec.pairs} & keys, "tied targets must be absent on disk"
        assert out.tied == frozenset(spec.pairs)
    else:
        assert config(path)["tie_word_embeddings"] is False
        assert names[arch][target] in keys
        assert out.tied == frozenset()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_untied_missing(arch, ckpt, outcome, names):
    spec = ARCHS[arch]
    path = ckpt(arch, "untied_missing")
    cfg = config(path)
    assert cfg["tie_word_embeddings"] is False
    if arch == "gemma3":
        assert cfg["text_config"]["tie_word_embeddings"] is True
    keys = set(disk_tensors(path))
    target, source = spec.head
    assert names[arch][source] in keys
    assert names[arch][target] not in keys
    out = outcome(arch, "untied_missing")
    assert out.error is None
    if arch == "t5":  # T5Config forces tie_word_embeddings=True on reload: loads fine, only a flag conflict
        assert not out.broken
        assert out.tied == frozenset(spec.pairs)
        assert not out.missing_keys
        return
    assert out.broken
    assert target in out.missing_keys
    assert spec.head not in out.tied
    assert any("LOAD REPORT" in w and target in w and "MISSING" in w for w in out.warnings)
    if arch == "bart":  # untied Bart also unties encoder/decoder embed_tokens from shared
        assert {t for t, _ in spec.pairs} <= out.missing_keys
    if arch == "bert":  # the decoder bias shared storage with cls.predictions.bias -> dropped too
        assert "cls.predictions.decoder.bias" in out.missing_keys


# ------------------------------------------------------------------------------------------ variants


@pytest.mark.parametrize("arch", ["llama", "mistral", "t5"])
def test_diverged(arch, ckpt, outcome, names):
    spec = ARCHS[arch]
    path = ckpt(arch, "diverged")
    assert config(path)["tie_word_embeddings"] is True  # mistral too: a fresh tied config
    t = disk_tensors(path)
    target, source = spec.head
    a, b = t[names[arch][target]], t[names[arch][source]]
    assert a.shape == b.shape and not torch.equal(a, b)
    torch.testing.assert_close(a, b + 0.05)
    out = outcome(arch, "diverged")
    assert out.broken and out.error is None
    assert out.not_tied == {(source, target)}
    assert any("will NOT tie" in w for w in out.warnings)
    assert out.tied == frozenset(spec.pairs[1:])  # T5: encoder/decoder embed_tokens still tied to shared


@pytest.mark.parametrize(
    ("arch", "layout"), [("llama", "safetensors"), ("bart", "safetensors-sharded"), ("gemma3", "bin")]
)
def test_both_missing(arch, layout, ckpt, outcome, names):
    spec = ARCHS[arch]
    path = ckpt(arch, "both_missing", layout)
    assert config(path)["tie_word_embeddings"] is True
    keys = set(disk_tensors(path))
    assert keys, "other weights must still be there"
    assert not {names[arch][n] for n in spec.head_group} & keys
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == keys
        assert set(weight_map.values()) == {f.name for f in path.glob("*.safetensors")}
    out = outcome(arch, "both_missing", layout)
    assert out.corrupted and out.broken
    assert any("seem corrupted" in w for w in out.warnings)
    assert set(spec.head_group) <= out.missing_keys


@pytest.mark.parametrize("arch", ["llama", "whisper"])
def test_shape_mismatch(arch, ckpt, outcome, names):
    spec = ARCHS[arch]
    path = ckpt(arch, "shape_mismatch")
    assert config(path)["tie_word_embeddings"] is True
    t = disk_tensors(path)
    target, source = spec.head
    assert t[names[arch][source]].shape == (64, 16)
    assert t[names[arch][target]].shape == (72, 16)
    out = outcome(arch, "shape_mismatch")
    assert out.error is not None and "ignore_mismatched_sizes" in out.error
    assert out.broken
    assert not out.missing_keys and not out.tied


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_redundant(arch, ckpt, outcome, names):
    spec = ARCHS[arch]
    path = ckpt(arch, "redundant")
    t = disk_tensors(path)
    target, source = spec.head
    assert torch.equal(t[names[arch][target]], t[names[arch][source]])
    out = outcome(arch, "redundant")
    assert not out.broken
    assert out.tied == frozenset(spec.pairs)


# ------------------------------------------------------------------------------------------ layouts


def test_bin_clean_shares_storage(ckpt, outcome):
    path = ckpt("llama", "clean", "bin")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "pytorch_model.bin"]
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    a, b = sd["lm_head.weight"], sd["model.embed_tokens.weight"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    out = outcome("llama", "clean", "bin")
    assert not out.broken and out.tied == frozenset(ARCHS["llama"].pairs)


def test_bin_untied_missing_drops_head(ckpt, outcome):
    path = ckpt("llama", "untied_missing", "bin")
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    assert "lm_head.weight" in outcome("llama", "untied_missing", "bin").missing_keys


def test_gemma3_legacy_names_on_disk(ckpt, names):
    assert names["gemma3"] == {
        "lm_head.weight": "language_model.lm_head.weight",
        "model.language_model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
    }
    keys = set(disk_tensors(ckpt("gemma3", "clean")))
    assert "language_model.model.embed_tokens.weight" in keys
    assert not any(k.startswith("model.language_model.") for k in keys)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sharded_safetensors(arch, ckpt, outcome, names):
    spec = ARCHS[arch]
    path = ckpt(arch, "redundant", "safetensors-sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 2 and "model.safetensors" not in shards
    assert set(index["weight_map"].values()) == set(shards)
    target, source = spec.head
    wm = index["weight_map"]
    assert wm[names[arch][target]] != wm[names[arch][source]], "head source and target must land in different shards"
    for f in shards:
        with safe_open(path / f, "pt") as fh:
            assert all(wm[k] == f for k in fh.keys())  # noqa: SIM118 - safe_open has no __iter__
    out = outcome(arch, "redundant", "safetensors-sharded")
    assert not out.broken and out.tied == frozenset(spec.pairs)


def test_sharded_bin(ckpt, outcome):
    path = ckpt("llama", "diverged", "bin-sharded")
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and "total_size" in index["metadata"]
    shards = sorted(p.name for p in path.glob("pytorch_model-*-of-*.bin"))
    assert len(shards) >= 2 and not (path / "pytorch_model.bin").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert not list(path.glob("*.safetensors"))
    assert outcome("llama", "diverged", "bin-sharded").not_tied == {("model.embed_tokens.weight", "lm_head.weight")}


# ------------------------------------------------------------------------------------------ capture


def test_load_outcome_restores_logging(ckpt):
    root = logging.getLogger("transformers")
    before = (root.level, list(root.handlers), root.propagate)
    out = load_outcome(ckpt("llama", "diverged"), "llama")
    assert out.not_tied
    assert (root.level, list(root.handlers), root.propagate) == before


def test_load_outcome_captures_even_when_verbosity_is_error(ckpt):
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        assert load_outcome(ckpt("llama", "both_missing"), "llama").corrupted
        assert hf_logging.get_verbosity() == logging.ERROR
    finally:
        hf_logging.set_verbosity(old)


# ------------------------------------------------------------------------------------------ demo


@pytest.mark.parametrize("name", ["llama-untied-missing-head", "llama-clean"])
def test_demo_dirs(name, tmp_path_factory):
    path = DEMO / name
    files = {p.name for p in path.iterdir()}
    assert files <= {"config.json", "generation_config.json", "model.safetensors"}
    assert {"config.json", "model.safetensors"} <= files
    assert sum((path / f).stat().st_size for f in files) < 200_000
    out = load_outcome(path, "llama")
    if name == "llama-clean":
        assert not out.broken and out.tied == frozenset(ARCHS["llama"].pairs)
    else:
        assert out.broken and "lm_head.weight" in out.missing_keys
        assert "lm_head.weight" not in disk_tensors(path)


# Version stamps say which release wrote a file, not what it holds: a new transformers or peft must not fail this.
STAMPS = frozenset({"transformers_version", "peft_version"})
# What a config decides about tying and loading: these keys at any depth, and every key that names a tie
LOAD_KEYS = frozenset({"architectures", "model_type", "vocab_size", "hidden_size", "dtype", "torch_dtype"})


def _tie_relevant(cfg: object) -> object:
    if isinstance(cfg, dict):
        kept = {k: _tie_relevant(v) for k, v in cfg.items() if k in LOAD_KEYS or "tie" in k or isinstance(v, dict)}
        return {k: v for k, v in kept.items() if v != {}}
    return cfg


def _off(value: object) -> bool:
    return value in (None, False, {}, [], "")


def _same_adapter_config(fresh: dict, committed: dict) -> list[str]:
    """Keys that differ, stamps aside; a key only one peft release writes must hold its off value (a feature the
    other release does not have is not in use)."""
    diffs = []
    for key in sorted((fresh.keys() | committed.keys()) - STAMPS):
        if key in fresh and key in committed:
            if fresh[key] != committed[key]:
                diffs.append(key)
        elif not _off(fresh.get(key, committed.get(key))):
            diffs.append(key)
    return diffs


def test_tie_relevant_keeps_ties_and_drops_stamps():
    cfg = {
        "transformers_version": "5.23.0",
        "use_cache": True,
        "tie_word_embeddings": False,
        "vocab_size": 64,
        "text_config": {"tie_word_embeddings": True, "rope_theta": 1.0, "transformers_version": "x"},
        "vision_config": {"hidden_act": "gelu"},
    }
    assert _tie_relevant(cfg) == {
        "tie_word_embeddings": False,
        "vocab_size": 64,
        "text_config": {"tie_word_embeddings": True},
    }
    assert _same_adapter_config({"r": 4, "peft_version": "1", "new_feature": None}, {"r": 4, "peft_version": "2"}) == []
    assert _same_adapter_config({"r": 4, "new_feature": {"on": 1}}, {"r": 4}) == ["new_feature"]
    assert _same_adapter_config({"r": 8}, {"r": 4}) == ["r"]


def test_demo_is_reproducible(tmp_path):
    """The committed demos are what `python -m fixtures.make_demo` writes: the same tensors bit for bit, the same
    tie-relevant config and the same adapter configuration, whatever release stamped the files."""
    from safetensors.torch import load_file

    from fixtures.make_demo import ADAPTER_DEMOS, DEMOS, make_demo

    make_demo(tmp_path)
    assert (DEMO / "README.md").is_file()
    for name in DEMOS:
        assert config(DEMO / name)["tie_word_embeddings"] is (name == "llama-clean")
        assert _tie_relevant(config(tmp_path / name)) == _tie_relevant(config(DEMO / name))
        fresh, committed = disk_tensors(tmp_path / name), disk_tensors(DEMO / name)
        assert fresh.keys() == committed.keys()
        assert all(torch.equal(fresh[k], committed[k]) for k in fresh)
    for name in ADAPTER_DEMOS:
        cfg = "adapter_config.json"
        fresh_cfg = json.loads((tmp_path / name / cfg).read_text())
        assert _same_adapter_config(fresh_cfg, json.loads((DEMO / name / cfg).read_text())) == []
        fresh = load_file(tmp_path / name / "adapter_model.safetensors")
        committed = load_file(DEMO / name / "adapter_model.safetensors")
        assert fresh.keys() == committed.keys()
        assert all(torch.equal(fresh[k], committed[k]) for k in fresh)
