"""Option aliases shared by the commands, so every command spells a flag the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PathArg = Annotated[
    str,
    typer.Argument(
        help="Checkpoint directory (model or PEFT adapter), or a Hub repo id in the local Hugging Face cache.",
        show_default=False,
        metavar="PATH",
    ),
]
# PATH stays the string the user typed: a Path would normalise `./org/name` into `org/name`, a Hub repo id
PathsArg = Annotated[
    list[str],
    typer.Argument(
        help="Checkpoint directories (models or PEFT adapters), Hub repo ids in the local cache, a trainer's "
        "output directory (its checkpoint-* folders), GGUF files, nanoGPT or llama2.c checkpoints (ckpt.pt, "
        "model.bin) or their run directory.",
        show_default=False,
        metavar="PATH",
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="For a Hub repo id: the branch, tag or commit to read from the local cache."),
]
BaseOpt = Annotated[
    str | None, typer.Option("--base", help="Base model directory for an adapter (a GGUF base for a GGUF adapter).")
]
AgainstOpt = Annotated[
    str | None,
    typer.Option(
        "--against",
        help="GGUF files: the Hugging Face checkpoint the file was converted from (its head is compared with the "
        "file's).",
    ),
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="Report format: text, json, sarif, github or markdown (default: text).",
        show_default=False,
    ),
]
RulesFormatOpt = Annotated[str, typer.Option("--format", "-f", help="text or json.")]
GraphFormatOpt = Annotated[str, typer.Option("--format", "-f", help="Graph format: text, json, mermaid or dot.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to FILE instead of stdout.")]
FailOnOpt = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        help="Lowest severity that makes the exit code 1: error, warning or info (default: warning).",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Read settings from this TOML file instead of the nearest pyproject.toml/tieaudit.toml."
    ),
]
IsolatedOpt = Annotated[bool, typer.Option("--isolated", help="Ignore configuration files.")]
ExitZeroOpt = Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even with findings (never masks 2 or 3).")]
SelectOpt = Annotated[
    list[str] | None,
    typer.Option("--select", help="Only these rules: codes, prefixes or names; repeat or comma-separate."),
]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Skip these rules: codes, prefixes or names.")]
ProbeOpt = Annotated[
    int, typer.Option("--probe-tokens", help="Probe hidden states for logit comparisons (0 disables).", min=0)
]
DeepOpt = Annotated[
    bool,
    typer.Option("--deep", help="Adapters: also run the real peft merge -> save -> reload and measure the logits."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Findings only.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also show every measured comparison.")]
ProgressOpt = Annotated[
    bool | None, typer.Option("--progress/--no-progress", help="Progress on stderr (default: on a TTY).")
]
NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Compute the declared tie map with transformers: no shipped table, no tie-map cache "
        "(also: TIEAUDIT_NO_CACHE=1).",
    ),
]
NoBaseOpt = Annotated[
    bool,
    typer.Option(
        "--no-base",
        help="Adapters: check the adapter alone when its base cannot be found (TIE106 becomes info instead of an "
        "error; the rules that need the base, TIE101-TIE105, do not run).",
    ),
]
NoPeftCheckOpt = Annotated[
    bool,
    typer.Option(
        "--no-peft-check",
        help="Adapters: do not hold the forecast to peft itself (no torch/peft import; findings say unconfirmed, "
        "tied layers only peft could judge get TIE105).",
    ),
]
PeftMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--peft-max-memory",
        help="GiB the peft check may use for the tied layers (default 6); above it, adapters are not checked by peft.",
        show_default=False,
    ),
]
TimingsOpt = Annotated[
    bool,
    typer.Option(
        "--timings",
        help="JSON: record wall-clock seconds (otherwise null, so the same input gives the same report).",
    ),
]
ColorOpt = Annotated[str, typer.Option("--color", help="auto, always or never (NO_COLOR is honoured).")]


def split_codes(values: list[str] | None) -> list[str] | None:
    """`--select A,B --select C` -> [A, B, C]."""
    if not values:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()]
