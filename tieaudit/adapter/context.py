"""What the adapter rules see: the base's tie graph, the adapter's edits, the forecasts and peft's verdicts, already
computed by `tieaudit.adapter.analysis`. Pure data: the rules do no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tieaudit.model import Location

if TYPE_CHECKING:  # annotations only: `tieaudit rules` and `explain` need the registry, not the analysis modules
    from tieaudit.adapter.confirm import PeftView
    from tieaudit.adapter.deep import Measured
    from tieaudit.adapter.files import AdapterSettings, ModuleEdit
    from tieaudit.adapter.forecast import GroupForecast
    from tieaudit.adapter.peft_table import Recorded
    from tieaudit.checkpoint.types import ConfigFile
    from tieaudit.ties.graph import TieGraph


@dataclass(frozen=True)
class BaseMismatch:
    """The adapter does not fit the base: a saved base copy differs, or shapes do not fit (TIE104)."""

    param: str
    kind: str  # "base-copy-differs" | "shape"
    detail: str
    max_abs_diff: float | None = None
    rel_diff: float | None = None


@dataclass(frozen=True)
class AdapterAlone:
    """An adapter whose base could not be found, and what it shows by itself."""

    reason: str  # why the base was not found, and how to give it
    base_name: str | None  # adapter_config.json's base_model_name_or_path
    architecture: str | None  # the class peft wrapped (adapter_config.json's auto_mapping)
    touched: tuple[tuple[str, str], ...]  # declared tie pairs (sorted names) with a layer the adapter changes
    ties_unavailable: str | None  # why the class's declared ties could not be read (None: they were)
    both_adapted: bool  # the adapter holds LoRA factors for both layers of a touched pair
    required: bool  # False with --no-base: the user asked for the adapter alone


@dataclass(frozen=True)
class AdapterContext:
    """What the adapter rules see: the base's tie graph, the adapter's edits, and the forecasts."""

    family: ClassVar[str] = "adapter"
    path: str
    base: str | None
    settings: AdapterSettings
    graph: TieGraph | None
    edits: dict[str, ModuleEdit]
    forecasts: tuple[GroupForecast, ...]
    mismatches: tuple[BaseMismatch, ...]
    probes: int
    adapter_config: ConfigFile | None = None
    measured: Measured | None = None
    ignored: tuple[tuple[str, str], ...] = ()  # (parameter, why peft ignores the file's weights for it)
    peft: tuple[PeftView, ...] = ()  # peft's own verdicts on the tied groups the adapter touches
    recorded: tuple[Recorded, ...] = ()  # groups whose forecast peft confirmed in a recorded run (the peft table)
    unverified: tuple[tuple[tuple[str, ...], str], ...] = ()  # touched tied groups nothing could judge, and why
    alone: AdapterAlone | None = None  # the base could not be found: what the adapter alone shows

    def edit_location(self, tensor: str) -> Location:
        """Point at the adapter_config.json key that puts this layer in the adapter (with its line)."""
        edit = self.edits.get(tensor)
        key = "/target_modules"
        if edit is not None and edit.full_copy:
            key = "/modules_to_save"
        elif edit is not None and edit.tokens and not edit.lora:
            key = "/trainable_token_indices"
        line = self.adapter_config.line_of(key) if self.adapter_config else None
        return Location(file="adapter_config.json", tensor=tensor, config_key=key, line=line)
