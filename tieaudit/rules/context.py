"""What a checkpoint rule sees: the tie graph and the config, already read. Rules do no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tieaudit.model import Location

if TYPE_CHECKING:  # annotations only: `tieaudit rules` and `explain` need the registry, not the analysis modules
    from tieaudit.checkpoint.types import ConfigFile, IndexMismatch
    from tieaudit.ties.graph import PairState, TieGraph


@dataclass(frozen=True)
class RuleContext:
    """What the checkpoint rules see (the adapter rules see `tieaudit.adapter.context.AdapterContext`)."""

    family: ClassVar[str] = "checkpoint"
    path: str  # the PATH as the user gave it, for fix hints
    graph: TieGraph
    config: ConfigFile | None
    index_file: str | None
    index_mismatches: tuple[IndexMismatch, ...]
    probes: int

    def flag_location(self, pair: PairState, tensor: str | None = None, file: str | None = None) -> Location:
        """A location pointing at the governing config key (and its line) and a tensor."""
        pointer = pair.flag.pointer if pair.flag else None
        line = None
        if self.config is not None and pointer is not None:
            line = self.config.line_of(pointer)
            if line is None:
                # the flag is absent (transformers' default applies): point at the object it belongs in
                parent = pointer.rsplit("/", 1)[0]
                line = self.config.line_of(parent) if parent else 1
        return Location(
            file=file or ("config.json" if self.config is not None else None),
            tensor=tensor,
            config_key=pointer,
            line=line,
        )

    def config_value(self, key: str) -> object:
        if self.config is None:
            return None
        return self.config.data.get(key)
