"""Renderers: pure functions from a `Report` (or a `BatchReport` of many targets) to the text of one format,
chosen by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tieaudit.model import BatchReport, Report, RuleDoc


@dataclass(frozen=True)
class RenderOptions:
    color: bool = False
    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose
    width: int | None = None  # wrap human output at words to this many columns (the terminal's); None: never wrap
    rules: tuple[RuleDoc, ...] = ()  # every rule's documentation (SARIF's driver.rules); the CLI passes the registry
    # wall-clock seconds in the JSON report (--timings); without them a report is a function of its input alone
    timings: bool = False


Renderer = Callable[[Report, RenderOptions], str]
BatchRenderer = Callable[[BatchReport, RenderOptions], str]


def renderers() -> dict[str, Renderer]:
    from tieaudit.report import (  # lazy: start-up imports the registry, not every renderer
        github,
        json_format,
        markdown,
        sarif,
        text,
    )

    return {
        "text": text.render,
        "json": json_format.render,
        "sarif": sarif.render,
        "github": github.render,
        "markdown": markdown.render,
    }


FORMATS = ("text", "json", "sarif", "github", "markdown")


def render(report: Report, fmt: str, options: RenderOptions | None = None) -> str:
    table = renderers()
    if fmt not in table:
        raise KeyError(fmt)
    return table[fmt](report, options or RenderOptions())


def render_batch(batch: BatchReport, fmt: str, options: RenderOptions | None = None) -> str:
    """One document covering every target of a batch (JSON: the per-target reports under a combined summary;
    SARIF: one run per target)."""
    from tieaudit.report import (  # lazy: start-up imports the registry, not every renderer
        github,
        json_format,
        markdown,
        sarif,
        text,
    )

    table: dict[str, BatchRenderer] = {
        "text": text.render_batch,
        "json": json_format.render_batch,
        "sarif": sarif.render_batch,
        "github": github.render_batch,
        "markdown": markdown.render_batch,
    }
    if fmt not in table:
        raise KeyError(fmt)
    return table[fmt](batch, options or RenderOptions())
