"""Rules: one module per family, each rule a function named after it, registered with its code.

TIE0xx (model checkpoints) live in `rules/checkpoint.py`, TIE1xx (adapters) in `rules/adapter.py`; find a rule by
its name there. `run` applies the selected rules to a context, in the one order every report uses.
"""

from tieaudit.rules.context import RuleContext
from tieaudit.rules.registry import RULES, Rule, all_rules, get_rule, run, selected, unknown_selectors

__all__ = ["RULES", "Rule", "RuleContext", "all_rules", "get_rule", "run", "selected", "unknown_selectors"]
