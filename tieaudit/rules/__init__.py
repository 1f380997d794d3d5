"""Rules: one module per family, each rule a function named after it, registered with its code.

TIE0xx (model checkpoints) live in `rules/checkpoint.py`; find a rule by its name there.
"""

from tieaudit.rules.context import RuleContext
from tieaudit.rules.registry import RULES, Rule, all_rules, get_rule, selected, unknown_selectors

__all__ = ["RULES", "Rule", "RuleContext", "all_rules", "get_rule", "selected", "unknown_selectors"]
