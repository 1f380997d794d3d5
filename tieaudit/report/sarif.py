"""SARIF 2.1.0 (what GitHub code scanning uploads): one run, the rules with their help text, one result per
finding with a physical location (the config key's real line, or line 1 of a weight file) and a logical location
naming the tensor, fingerprints computed by tieaudit (the files are binary, so line-hash fingerprints are
meaningless), and each skipped check as a tool execution notification."""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from tieaudit.model import Report, RuleDoc, Severity
from tieaudit.report.paths import finding_line, finding_path

if TYPE_CHECKING:
    from tieaudit.report import RenderOptions

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://github.com/tieaudit/tieaudit"
LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def _rule(doc: RuleDoc) -> dict[str, Any]:
    return {
        "id": doc.code,
        "name": doc.name,
        "shortDescription": {"text": doc.summary},
        "fullDescription": {"text": doc.explain.split("\n\n", 1)[0]},
        "help": {"text": doc.explain, "markdown": doc.explain},
        "defaultConfiguration": {"level": LEVELS[doc.severity]},
        "properties": {"tags": ["weight-tying"]},
    }


def _docs(report: Report, options: RenderOptions) -> list[RuleDoc]:
    if options.rules:
        return sorted(options.rules, key=lambda r: r.code)
    # rendered without the registry (the Python API): document at least the rules that fired
    seen = {f.code: RuleDoc(f.code, f.name, f.severity, f.name, f.message) for f in report.findings}
    return [seen[c] for c in sorted(seen)]


def _uri(path: str) -> dict[str, str]:
    if PurePath(path).is_absolute():
        return {"uri": PurePath(path).as_uri()}
    return {"uri": path, "uriBaseId": "%SRCROOT%"}


def sarif_dict(report: Report, options: RenderOptions) -> dict[str, Any]:
    docs = _docs(report, options)
    index = {d.code: i for i, d in enumerate(docs)}
    results = []
    for f in report.findings:
        location: dict[str, Any] = {
            "physicalLocation": {
                "artifactLocation": _uri(finding_path(report, f)),
                "region": {"startLine": finding_line(f)},
            }
        }
        if f.location.tensor:
            location["logicalLocations"] = [
                {"name": f.location.tensor, "fullyQualifiedName": f.location.tensor, "kind": "member"}
            ]
        result: dict[str, Any] = {
            "ruleId": f.code,
            "level": LEVELS[f.severity],
            "message": {"text": f.message},
            "locations": [location],
            "partialFingerprints": {"tieauditFingerprint/v1": f.fingerprint},
            "properties": {"evidence": json.loads(json.dumps(dict(f.evidence), default=str))},
        }
        if f.code in index:
            result["ruleIndex"] = index[f.code]
        if f.fix is not None:
            result["properties"]["fix"] = {
                "applicability": f.fix.applicability,
                "command": f.fix.command,
                "description": f.fix.description,
            }
        results.append(result)
    notifications = [
        {"level": "note", "message": {"text": f"{s.check}: {s.reason}"}, "descriptor": {"id": s.check}}
        for s in report.skipped
    ]
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "tieaudit",
                        "version": report.tool_version,
                        "semanticVersion": report.tool_version,
                        "informationUri": INFORMATION_URI,
                        "rules": [_rule(d) for d in docs],
                    }
                },
                "invocations": [
                    {
                        "executionSuccessful": True,
                        "exitCode": report.exit_code,
                        "toolExecutionNotifications": notifications,
                    }
                ],
                "automationDetails": {"id": f"tieaudit/{report.target.path}/"},  # one category per checkpoint
                "results": results,
                "properties": {"target": report.target.path, "architecture": report.target.architecture},
            }
        ],
    }


def render(report: Report, options: RenderOptions) -> str:
    return json.dumps(sarif_dict(report, options), indent=2, allow_nan=False) + "\n"
