"""tieaudit: find, explain and repair broken weight tying in Hugging Face checkpoints.

    >>> import tieaudit
    >>> report = tieaudit.audit("./checkpoint")      # a directory: reads headers, and tensors only when needed
    >>> report.exit_code, [f.code for f in report.findings]
    >>> tieaudit.audit_many(["./run/checkpoint-500", "./run"])  # several; a run directory means its checkpoints
    >>> tieaudit.audit_model(model)                   # a live model, e.g. in a training loop
    >>> tieaudit.fix("./checkpoint", mode="untie", output_dir="./fixed")  # repair, atomically; re-audited
    >>> tieaudit.merge("./adapter", base="./base", output_dir="./merged")  # exact merge, also on tied weights

Imports are lazy: `import tieaudit` does not import torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tieaudit._version import __version__
from tieaudit.errors import InputError, NothingToAudit, TieauditError, UsageError, WriteError
from tieaudit.model import (
    BatchReport,
    Comparison,
    FileChange,
    Finding,
    FixOutcome,
    FixRun,
    Location,
    MergeGroup,
    MergeRun,
    Report,
    Severity,
    TargetError,
    TieGroup,
    TieStatus,
)

if TYPE_CHECKING:
    from tieaudit.auditing import audit
    from tieaudit.batch import audit_many
    from tieaudit.live import audit_model
    from tieaudit.repair.fix import fix
    from tieaudit.repair.merge import merge

__all__ = [
    "BatchReport",
    "Comparison",
    "FileChange",
    "Finding",
    "FixOutcome",
    "FixRun",
    "InputError",
    "Location",
    "MergeGroup",
    "MergeRun",
    "NothingToAudit",
    "Report",
    "Severity",
    "TargetError",
    "TieGroup",
    "TieStatus",
    "TieauditError",
    "UsageError",
    "WriteError",
    "__version__",
    "audit",
    "audit_many",
    "audit_model",
    "fix",
    "merge",
    "report_to_dict",
]


def __getattr__(name: str) -> Any:
    if name == "audit":
        from tieaudit.auditing import audit  # lazy: `import tieaudit` stays cheap (module __getattr__)

        return audit
    if name == "audit_many":
        from tieaudit.batch import audit_many  # lazy: `import tieaudit` stays cheap (module __getattr__)

        return audit_many
    if name == "audit_model":
        from tieaudit.live import audit_model  # lazy: `import tieaudit` stays cheap (module __getattr__)

        return audit_model
    if name == "merge":
        from tieaudit.repair.merge import merge  # lazy: `import tieaudit` stays cheap (module __getattr__)

        return merge
    if name == "fix":
        from tieaudit.repair.fix import fix  # lazy: `import tieaudit` stays cheap (module __getattr__)

        return fix
    if name == "report_to_dict":
        from tieaudit.report.json_format import report_dict  # lazy: `import tieaudit` stays cheap (module __getattr__)

        return report_dict
    raise AttributeError(f"module 'tieaudit' has no attribute {name!r}")
