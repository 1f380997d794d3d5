"""SARIF 2.1.0 (what GitHub code scanning uploads): one run, the rules with their help text, one result per
finding with a physical location (the config key's real line, or line 1 of a weight file) and a logical location
naming the tensor, fingerprints computed by tieaudit (the files are binary, so line-hash fingerprints are
meaningless), and each skipped check as a tool execution notification. A batch is one run too (GitHub code scanning
accepts at most 20 runs per file, and a training run can save more checkpoints than that): every target's results,
each located in its own checkpoint, and a target that could not be audited as an error notification."""

from __future__ import annotations

import json
import os
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from tieaudit.model import BatchReport, Report, RuleDoc, Severity, TargetError
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


def _docs(reports: tuple[Report, ...], options: RenderOptions) -> list[RuleDoc]:
    if options.rules:
        return sorted(options.rules, key=lambda r: r.code)
    # rendered without the registry (the Python API): document at least the rules that fired
    seen = {f.code: RuleDoc(f.code, f.name, f.severity, f.name, f.message) for r in reports for f in r.findings}
    return [seen[c] for c in sorted(seen)]


def _driver(version: str, docs: list[RuleDoc]) -> dict[str, Any]:
    return {
        "driver": {
            "name": "tieaudit",
            "version": version,
            "semanticVersion": version,
            "informationUri": INFORMATION_URI,
            "rules": [_rule(d) for d in docs],
        }
    }


def _uri(path: str) -> dict[str, str]:
    if PurePath(path).is_absolute():
        return {"uri": PurePath(path).as_uri()}
    return {"uri": path, "uriBaseId": "%SRCROOT%"}


def _run(report: Report, docs: list[RuleDoc]) -> dict[str, Any]:
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
    # one category per checkpoint (per repo for a Hub repo id, whatever commit is cached)
    category = report.target.repo.repo_id if report.target.repo else report.target.path
    properties: dict[str, Any] = {"target": report.target.path, "architecture": report.target.architecture}
    if report.target.repo is not None:
        properties["repo"] = str(report.target.repo)
    return {
        "tool": _driver(report.tool_version, docs),
        "invocations": [
            {"executionSuccessful": True, "exitCode": report.exit_code, "toolExecutionNotifications": notifications}
        ],
        "automationDetails": {"id": f"tieaudit/{category}/"},
        "results": results,
        "properties": properties,
    }


def sarif_dict(report: Report, options: RenderOptions) -> dict[str, Any]:
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [_run(report, _docs((report,), options))]}


def batch_sarif_dict(batch: BatchReport, options: RenderOptions) -> dict[str, Any]:
    docs = _docs(batch.reports, options)
    results: list[dict[str, Any]] = []
    notifications: list[dict[str, Any]] = []
    names: list[str] = []
    for item in batch.items:
        if isinstance(item, TargetError):
            names.append(item.path)
            notifications.append(
                {
                    "level": "error",
                    "message": {"text": f"{item.path}: not audited (exit {item.exit_code}): {item.message}"},
                }
            )
            continue
        run = _run(item, docs)
        names.append(item.target.name)
        results += run["results"]
        for n in run["invocations"][0]["toolExecutionNotifications"]:
            notifications.append({**n, "message": {"text": f"{item.target.name}: {n['message']['text']}"}})
    common = os.path.commonpath(names) if names and len({os.path.isabs(n) for n in names}) == 1 else ""
    run = {
        "tool": _driver(batch.tool_version, docs),
        "invocations": [
            {
                "executionSuccessful": not batch.errors,
                "exitCode": batch.exit_code,
                "toolExecutionNotifications": notifications,
            }
        ],
        "automationDetails": {"id": f"tieaudit/{common or 'batch'}/"},
        "results": results,
        "properties": {"targets": names},
    }
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}


def render(report: Report, options: RenderOptions) -> str:
    return json.dumps(sarif_dict(report, options), indent=2, allow_nan=False) + "\n"


def render_batch(batch: BatchReport, options: RenderOptions) -> str:
    return json.dumps(batch_sarif_dict(batch, options), indent=2, allow_nan=False) + "\n"
