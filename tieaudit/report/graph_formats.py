"""The tie graph as a diagram: Mermaid (for markdown, GitHub renders it) and Graphviz dot. Pure functions of the
report's groups. Each edge goes from a target to the source it is tied to (or meant to be), labelled with the
governing flag and the group's status; a broken edge (diverged, missing) is drawn red and thick."""

from __future__ import annotations

import json

from tieaudit.model import Report, TieGroup, TieStatus

BROKEN = (TieStatus.DIVERGED, TieStatus.MISSING)
_COLORS = {
    TieStatus.TIED: "#2da44e",
    TieStatus.UNTIED: "#0969da",
    TieStatus.DIVERGED: "#cf222e",
    TieStatus.MISSING: "#cf222e",
}


def _flag(g: TieGroup) -> str:
    if g.governing_flag is None:
        return "observed only"
    if g.flag_value is None:  # a rule without a value (a GGUF file: llama.cpp's loader for the architecture)
        return g.governing_flag
    flag = g.governing_flag.split(":", 1)[-1].rsplit("/", 1)[-1]
    return f"{flag}={str(g.flag_value).lower()}"


def _where(g: TieGroup, name: str) -> str:
    return g.stored.get(name) or "not stored"


def mermaid(report: Report) -> str:
    """A Mermaid flowchart (`graph LR`) of the tie graph, one node per tensor."""
    lines = ["graph LR"]
    ids: dict[str, str] = {}
    links: list[TieStatus] = []

    def node(g: TieGroup, name: str) -> str:
        if name not in ids:
            ids[name] = f"n{len(ids)}"
            label = f"{name}<br/><i>{_where(g, name)}</i>".replace('"', "#quot;")
            shape = f'(["{label}"])' if g.stored.get(name) is None else f'["{label}"]'
            lines.append(f"  {ids[name]}{shape}")
        return ids[name]

    for g in report.groups:
        src = node(g, g.source)
        for target in g.targets:
            tgt = node(g, target)
            label = f"{_flag(g)} · {g.status.value}".replace('"', "#quot;")
            arrow = "-.->" if g.status is TieStatus.UNTIED else "-->"
            lines.append(f'  {tgt} {arrow}|"{label}"| {src}')
            links.append(g.status)
    if not report.groups:
        lines.append('  empty["no tied or tie-able tensors"]')
    for i, status in enumerate(links):
        width = "3px" if status in BROKEN else "1.5px"
        lines.append(f"  linkStyle {i} stroke:{_COLORS[status]},stroke-width:{width}")
    return "\n".join(lines) + "\n"


def dot(report: Report) -> str:
    """A Graphviz digraph of the tie graph (`tieaudit graph -f dot | dot -Tsvg`)."""

    def q(text: str) -> str:
        return json.dumps(text)  # a valid dot string: double quotes, escaped

    lines = ["digraph tieaudit {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
    seen: set[str] = set()
    for g in report.groups:
        for name in g.members:
            if name in seen:
                continue
            seen.add(name)
            style = ", style=dashed" if g.stored.get(name) is None else ""
            lines.append(f"  {q(name)} [label={q(name + chr(10) + _where(g, name))}{style}];")
        for target in g.targets:
            broken = g.status in BROKEN
            attrs = [f"label={q(_flag(g) + chr(10) + g.status.value)}", f"color={q(_COLORS[g.status])}"]
            if broken:
                attrs.append("penwidth=3")
            if g.status is TieStatus.UNTIED:
                attrs.append("style=dashed")
            lines.append(f"  {q(target)} -> {q(g.source)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
