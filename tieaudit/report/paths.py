"""Where a finding points, as a path a CI system can resolve: the target's path joined with the file in it."""

from __future__ import annotations

import posixpath
from pathlib import PurePath

from tieaudit.model import Finding, Report


def finding_path(report: Report, finding: Finding) -> str:
    """The file a finding points at, relative to where tieaudit ran when the target path was relative (as CI
    annotations and SARIF `%SRCROOT%` expect), absolute otherwise. Findings without a file point at the target."""
    base = PurePath(report.target.path).as_posix()
    file = finding.location.file
    return posixpath.normpath(posixpath.join(base, file)) if file else posixpath.normpath(base)


def finding_line(finding: Finding) -> int:
    """The 1-based line: the config key's for config findings, else 1 (weight files are binary)."""
    return finding.location.line if finding.location.line and finding.location.line >= 1 else 1
