"""The correctness bar: tieaudit's verdict agrees with what transformers really does on load.

Every case is a real checkpoint made by real transformers calls (fixtures/builders.py), loaded back
with `from_pretrained`; tieaudit must call it broken exactly when transformers loads a random tensor,
refuses to tie with a warning, reports corruption, or fails.
"""

from __future__ import annotations

import pytest

from fixtures.builders import ARCHS, LAYOUTS, VARIANTS
from tieaudit import audit
from tieaudit.model import Severity

# the code each variant must raise (None: none); the library decides "broken", this decides "which rule"
EXPECTED = {
    "clean": None,
    "diverged": "TIE001",
    "untied_missing": "TIE002",
    "both_missing": "TIE003",
    "shape_mismatch": "TIE004",
    "redundant": "TIE006",
}

CASES = [(a, v, lay) for a in ARCHS for v in VARIANTS for lay in LAYOUTS]


def _ids(case: tuple[str, str, str]) -> str:
    return "-".join(case)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_verdict_matches_transformers(case: tuple[str, str, str], checkpoint, outcome) -> None:
    arch, variant, layout = case
    path = checkpoint(arch, variant, layout)
    real = outcome(path, arch)
    report = audit(path)
    errors = [f for f in report.findings if f.severity is Severity.ERROR]
    codes = {f.code for f in report.findings}

    # 1. broken in transformers <=> an error finding, exit 1
    assert bool(errors) == real.broken, (real, [f.message for f in report.findings])
    if real.broken:
        assert report.exit_code == 1
        assert all(f.location.tensor and f.location.config_key for f in errors)

    # 2. the right rule for the case
    expected = EXPECTED[variant]
    forced_tie = arch == "t5" and variant == "untied_missing"  # T5Config forces the tie back on
    if forced_tie:
        assert not real.broken
        assert codes == {"TIE005"}, report.findings
    elif expected is None:
        assert codes == set(), [f.message for f in report.findings]
        assert report.exit_code == 0
    else:
        assert expected in codes, [f.message for f in report.findings]

    # 3. clean loads have no warnings either (the flag-conflict case aside)
    if not real.broken and not forced_tie:
        assert not [f for f in report.findings if f.severity is Severity.WARNING]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_graph_names_the_declared_pairs(arch: str, checkpoint) -> None:
    """Names come from the model classes: wte, shared, proj_out, cls.predictions.decoder ..."""
    report = audit(checkpoint(arch, "clean", "safetensors"), probe_tokens=0)
    pairs = {(t, g.source) for g in report.groups for t in g.targets}
    assert set(ARCHS[arch].pairs) <= pairs
