"""The peft oracle (tieaudit.adapter.oracle) is peft: on every adapter case of the verdict suite it gives, for the tied
layers alone, the same run-time weights as the real unmerged PeftModel and the same weights as peft's real
merge_and_unload -> save_pretrained -> from_pretrained (fixtures.adapter_builders.reality loads whole models)."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.adapter_builders import ADAPTER_ARCHS, ADAPTER_CASES, ADAPTER_SPECS, UNSUPPORTED
from tieaudit.adapter.oracle import OracleUnavailable, ask_peft
from tieaudit.checkpoint import open_checkpoint
from tieaudit.ties.compare import probe_states

CASES = [(a, c) for a in ADAPTER_ARCHS for c in ADAPTER_CASES if (a, c) not in UNSUPPORTED]
TOL = 1e-5  # float32: the same operations in another order


def _values(base_ckpt, arch: str) -> dict[str, str]:
    """The embedding and head of the fixture architecture -> the stored base tensor each loads."""
    spec = ADAPTER_SPECS[arch]
    leaf = spec.embed.rpartition(".")[2]
    emb = next(k for k in base_ckpt.tensors if k.endswith(f"{leaf}.weight"))
    head = spec.head_weight if spec.head_weight in base_ckpt.tensors else emb
    return {spec.embed_weight: emb, spec.head_weight: head}


def _close(probe, weight, ids, h) -> None:
    w = weight.float().numpy()
    scale = float(np.abs(h @ w.T).max())
    assert np.abs(probe.rows - w[ids]).max() <= TOL
    assert np.abs(probe.logits - h @ w.T).max() <= TOL * max(1.0, scale)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_oracle_is_peft(case: tuple[str, str], adapter_case) -> None:
    arch, name = case
    base, adapter, real = adapter_case(arch, name)
    spec = ADAPTER_SPECS[arch]
    with open_checkpoint(base) as b:
        values = _values(b, arch)
        vocab, hidden = b.tensors[values[spec.embed_weight]].shape
        ids = sorted({*range(0, vocab, 5), 1, 2, 3})
        h = probe_states(8, hidden)
        res = ask_peft(b, adapter, values, ids, h, merge=True)
    _close(res.runtime[spec.embed_weight], real.runtime_embed, ids, h)
    _close(res.runtime[spec.head_weight], real.runtime_head, ids, h)
    assert res.merged is not None and res.merged_config_tied is real.merged_config_tied
    _close(res.merged[spec.embed_weight], real.merged_embed, ids, h)
    merged_head = res.merged[spec.head_weight]
    if merged_head is None:  # dropped by the save and not tied on load: transformers initialises it randomly
        assert not real.merged_head_stored and not real.merged_config_tied
    else:
        _close(merged_head, real.merged_head, ids, h)


def test_oracle_refuses_over_its_memory_bound(adapter_case) -> None:
    base, adapter, _ = adapter_case("llama", "lora_embed")
    with open_checkpoint(base) as b:
        values = _values(b, "llama")
        with pytest.raises(OracleUnavailable, match="GiB"):
            ask_peft(b, adapter, values, [0], probe_states(2, 16), max_bytes=1000)


def test_oracle_reports_what_peft_refuses(adapter_case, tmp_path) -> None:
    import json
    import shutil

    base, adapter, _ = adapter_case("llama", "lora_embed")
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["peft_type"] = "NOT_A_PEFT_TYPE"
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    with open_checkpoint(base) as b, pytest.raises(OracleUnavailable, match="peft cannot apply the adapter"):
        ask_peft(b, broken, _values(b, "llama"), [0], probe_states(2, 16))
