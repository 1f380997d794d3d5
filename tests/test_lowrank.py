"""The low-rank forecast (tieaudit.adapter.lowrank) measures what materialising every weight measures.

Two levels: `compare_lowrank` against the weights built explicitly in float64 (random factors, replaced rows,
several chunks and blocks), and the whole adapter audit through the low-rank path against the streaming
reference path (`audit(..., forecast="stream")`) on the real peft adapters of the verdict tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fixtures.adapter_builders import ADAPTER_ARCHS, ADAPTER_CASES, case_base_tied
from tieaudit import audit
from tieaudit.adapter import lowrank
from tieaudit.adapter.lowrank import Factor, LowRankWeight, compare_lowrank
from tieaudit.ties.compare import probe_states


def _explicit(w0: np.ndarray, factors: list[Factor], weight: LowRankWeight) -> np.ndarray:
    out = w0.astype(np.float64).copy()
    for c, f in zip(weight.coeffs, factors, strict=True):
        out += c * (f.left.astype(np.float64) @ f.right.astype(np.float64))
    for r, values in weight.rows.items():
        out[r] = values
    return out


def _top1(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (h.astype(np.float64) @ w.T).argmax(axis=1)


@pytest.mark.parametrize("read_ahead", [False, True], ids=["in-line", "read-ahead"])
@pytest.mark.parametrize("seed", range(6))
def test_compare_lowrank_equals_the_materialised_weights(
    seed: int, read_ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(seed)
    vocab, hidden = int(rng.integers(40, 90)), int(rng.integers(8, 24))
    monkeypatch.setattr(lowrank, "BLOCK_ROWS", 7)  # blocks inside chunks, chunks not multiples of blocks
    w0 = rng.standard_normal((vocab, hidden)).astype(np.float32)
    factors = [
        Factor(
            rng.standard_normal((vocab, r)).astype(np.float32) * 0.3,
            rng.standard_normal((r, hidden)).astype(np.float32) * 0.3,
        )
        for r in (2, 3)
    ]
    token_rows = {int(t): rng.standard_normal(hidden).astype(np.float32) for t in rng.choice(vocab, 4, replace=False)}
    other_rows = {int(t): rng.standard_normal(hidden).astype(np.float32) for t in rng.choice(vocab, 2, replace=False)}
    a = LowRankWeight((1.0, 0.0), token_rows)  # one member at run time, with trainable tokens
    b = LowRankWeight((0.0, 1.0))  # the other member
    merged = LowRankWeight((1.0, 2.0), {**token_rows, **other_rows})  # a double merge, rows of both
    same_as_b = LowRankWeight((0.0, 1.0))  # equal to b by value: measured once, reported twice
    pairs = [(a, b), (merged, a), (merged, b), (b, same_as_b), (same_as_b, b)]
    h = probe_states(16, hidden)
    probe_rows = sorted({int(x) for x in rng.integers(0, vocab, 10)} | set(token_rows))
    results = compare_lowrank(
        lambda s, e: w0[s:e].copy(),
        (vocab, hidden),
        factors,
        pairs,
        h=h,
        probe_rows=probe_rows,
        chunk_rows=11,
        read_ahead=read_ahead,
    )
    for (x, y), got in zip(pairs, results, strict=True):
        ex, ey = _explicit(w0, factors, x), _explicit(w0, factors, y)
        d = ex - ey
        if not d.any():
            assert got.diff.bitwise_equal and got.diff.max_abs_diff == 0.0 and got.diff.top1_agreement == 1.0
            continue
        assert not got.diff.bitwise_equal
        assert got.diff.max_abs_diff == pytest.approx(np.abs(d).max(), rel=1e-5)
        assert got.diff.rel_diff == pytest.approx(np.linalg.norm(d) / np.linalg.norm(ex), rel=1e-5)
        logits = h.astype(np.float64) @ d.T
        assert got.diff.max_abs_logit_diff == pytest.approx(np.abs(logits).max(), rel=1e-4)
        assert got.diff.top1_agreement == pytest.approx(float((_top1(h, ex) == _top1(h, ey)).mean()))
        assert got.probe_rows_max == pytest.approx(np.abs(d[probe_rows]).max(), rel=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_max_of_a_product_takes_few_rows_and_equals_the_full_product(seed: int) -> None:
    """The pruned max (rows in decreasing norm, stopped by the Cauchy-Schwarz bound) is the full product's max."""
    rng = np.random.default_rng(seed)
    rows, rank, hidden = 5000, int(rng.integers(1, 17)), 64
    left = (rng.standard_normal((rows, rank)) * rng.lognormal(0, 0.5, (rows, 1))).astype(np.float32)
    right = rng.standard_normal((rank, hidden)).astype(np.float32)
    skip = {int(r) for r in rng.choice(rows, 50, replace=False)}
    full = np.abs(left @ right)
    keep = np.array([r not in skip for r in range(rows)])
    taken: list[int] = []

    class Counting(np.ndarray):
        def __getitem__(self, idx: object) -> object:
            if isinstance(idx, np.ndarray):
                taken.append(idx.size)
            return np.asarray(self).__getitem__(idx)

    got = lowrank._max_abs_product(left.view(Counting), right, skip)
    assert got == float(full[keep].max())
    assert sum(taken) < rows // 2  # the bound stopped it early
    assert lowrank._max_abs_product(left, right, set()) == float(full.max())
    assert lowrank._max_abs_product(np.zeros_like(left), right, set()) == 0.0


def test_max_of_a_product_with_non_finite_factors() -> None:
    left = np.ones((40, 2), np.float32)
    right = np.ones((2, 3), np.float32)
    left[17, 1] = np.nan
    assert math.isnan(lowrank._max_abs_product(left, right, set()))
    assert lowrank._max_abs_product(left, right, {17}) == 2.0
    left[17, 1] = np.inf
    assert lowrank._max_abs_product(left, right, set()) == math.inf


def test_compare_lowrank_without_probes_or_factors() -> None:
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((30, 6)).astype(np.float32)
    row = rng.standard_normal(6).astype(np.float32)
    a, b = LowRankWeight(()), LowRankWeight((), {3: row})
    [got] = compare_lowrank(lambda s, e: w0[s:e].copy(), (30, 6), [], [(a, b)], chunk_rows=4)
    d = w0[3].astype(np.float64) - row
    assert got.diff.max_abs_logit_diff is None and got.diff.top1_agreement is None
    assert got.diff.max_abs_diff == pytest.approx(np.abs(d).max())
    assert got.diff.rel_diff == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w0))
    [same] = compare_lowrank(lambda s, e: w0[s:e].copy(), (30, 6), [], [(a, LowRankWeight(()))])
    assert same.diff.bitwise_equal and same.diff.rel_diff == 0.0


def test_zero_lora_b_is_no_difference() -> None:
    """peft initialises B to zero: an untrained LoRA changes nothing, bitwise."""
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((20, 5)).astype(np.float32)
    f = Factor(np.zeros((20, 2), np.float32), rng.standard_normal((2, 5)).astype(np.float32))  # linear: B is left
    [got] = compare_lowrank(lambda s, e: w0[s:e].copy(), (20, 5), [f], [(LowRankWeight((1.0,)), LowRankWeight((0.0,)))])
    assert got.diff.bitwise_equal


CASES = [(a, c) for a in ADAPTER_ARCHS for c in ADAPTER_CASES if case_base_tied(c)]


def _close(x: float | None, y: float | None, rel: float) -> bool:
    if x is None or y is None:
        return x is y
    return math.isclose(x, y, rel_tol=rel, abs_tol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_lowrank_audit_equals_the_streaming_reference(case, adapter_case, monkeypatch: pytest.MonkeyPatch) -> None:
    arch, name = case
    base, adapter, _ = adapter_case(arch, name)
    fast = audit(adapter, base=base)
    ref = audit(adapter, base=base, forecast="stream")
    assert [f.code for f in fast.findings] == [f.code for f in ref.findings]
    assert len(fast.comparisons) == len(ref.comparisons)
    for c, r in zip(fast.comparisons, ref.comparisons, strict=True):
        assert (c.stage, c.source, c.target, c.tensor, c.bitwise_equal) == (
            r.stage,
            r.source,
            r.target,
            r.tensor,
            r.bitwise_equal,
        )
        assert _close(c.max_abs_diff, r.max_abs_diff, 1e-4), (c, r)
        assert _close(c.rel_diff, r.rel_diff, 1e-3), (c, r)
        assert _close(c.max_abs_logit_diff, r.max_abs_logit_diff, 1e-3), (c, r)
        assert c.top1_agreement == r.top1_agreement, (c, r)
        assert _close(c.embedding_rows_max_abs_diff, r.embedding_rows_max_abs_diff, 1e-4), (c, r)


@pytest.mark.parametrize(
    ("arch", "case"), [("llama", "lora_embed"), ("gpt2", "lora_both_tying"), ("llama", "trainable_tokens")]
)
def test_adapter_check_on_a_cached_base_imports_no_torch(arch, case, adapter_case, tmp_path) -> None:
    """The forecast alone (`--no-peft-check`): after the base's tie map is cached, a LoRA / trainable-token forecast
    runs on numpy alone, with the same verdicts and numbers as the peft-confirmed check, and the report says that
    peft was not asked. With the peft check and the shipped peft table off, peft itself is imported and asked."""
    import json
    import os
    import subprocess
    import sys

    base, adapter, _ = adapter_case(arch, case)
    expected = audit(adapter, base=base)  # in process: also fills the tie-map cache the subprocess reads
    script = (
        "import json, sys; from tieaudit import audit\n"
        f"r = audit({str(adapter)!r}, base={str(base)!r}, peft_check=sys.argv[1] == 'on')\n"
        "heavy = sorted({'torch', 'transformers', 'peft'} & set(sys.modules))\n"
        "print(json.dumps([[f.code for f in r.findings], {c.stage + str(c.tensor): c.max_abs_diff "
        "for c in r.comparisons}, heavy, [s.check for s in r.skipped]]))\n"
    )
    ours = {c.stage + str(c.tensor): c.max_abs_diff for c in expected.comparisons if not c.stage.startswith("peft-")}
    # off: --no-peft-check; on: peft run (the shipped peft table switched off, so peft is really asked)
    for mode, table in (("off", {}), ("on", {"TIEAUDIT_NO_TABLE": "1"})):
        run = subprocess.run(
            [sys.executable, "-c", script, mode],
            env={**os.environ, **table},
            capture_output=True,
            text=True,
            check=True,
        )
        codes, diffs, heavy, skipped = json.loads(run.stdout)
        assert codes == [f.code for f in expected.findings]
        assert {k: v for k, v in diffs.items() if not k.startswith("peft-")} == ours
        if mode == "off":
            assert heavy == [] and "peft-confirmation" in skipped
        else:
            assert heavy == ["peft", "torch", "transformers"] and "peft-confirmation" not in skipped
            assert any(k.startswith("peft-") for k in diffs)


@pytest.mark.parametrize("chunk", [8, 24, 1000])
def test_same_bytes_compares_every_byte(chunk: int, tmp_path) -> None:
    """The base-copy check compares 8 bytes at a time plus the tail: a difference in any byte is found."""
    import torch
    from safetensors.torch import save_file

    from tieaudit.adapter.analysis import same_bytes
    from tieaudit.checkpoint import open_checkpoint

    values = torch.arange(101, dtype=torch.uint8).reshape(101, 1)  # 101 bytes: not a multiple of 8
    for i, where in enumerate([None, 0, 50, 99, 100]):
        other = values.clone()
        if where is not None:
            other[where] += 1
        for name, t in (("a", values), ("b", other)):
            d = tmp_path / f"{name}{i}"
            d.mkdir()
            save_file({"w": t}, str(d / "model.safetensors"))
        with open_checkpoint(tmp_path / f"a{i}") as a, open_checkpoint(tmp_path / f"b{i}") as b:
            equal, read = same_bytes(a, "w", b, "w", chunk=chunk)
        assert equal is (where is None), where
        assert 0 < read <= 101


@pytest.mark.parametrize("read_ahead", [False, True], ids=["in-line", "read-ahead"])
def test_a_failing_read_stops_the_comparison(read_ahead: bool) -> None:
    """A read that fails (a file truncated under the check) raises out of compare_lowrank, read ahead or not."""
    w0 = np.ones((40, 4), np.float32)
    reads: list[int] = []

    def reader(s: int, e: int) -> np.ndarray:
        reads.append(s)
        if s >= 20:
            raise OSError("truncated")
        return w0[s:e].copy()

    pair = (LowRankWeight(()), LowRankWeight((), {30: np.zeros(4, np.float32)}))
    with pytest.raises(OSError, match="truncated"):
        compare_lowrank(reader, (40, 4), [], [pair], chunk_rows=10, read_ahead=read_ahead)
    assert max(reads) == 20  # nothing read after the failure
