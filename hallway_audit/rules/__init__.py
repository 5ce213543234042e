"""Rule files: YAML thresholds and rules that turn metrics into verdicts and a CI gate.

    ruleset = load_rules(["default.yaml"])            # bundled name or a path
    outcomes = evaluate(ruleset, subjects)            # fired / passed / skipped
    ok = gate(outcomes, fail_on="error")              # True = gate passed

Modules, one job each: `expr` (the safe expression evaluator), `template`
(message templates), `schema` (Rule, RuleSet, the vocabulary), `verdicts` (the
verdict registry), `loader` (YAML, extends, validation), `evaluate` (running
rules, summarize, gate).
"""

from __future__ import annotations

from .evaluate import FAIL_ON, Outcome, Subject, evaluate, gate, severity_rank, summarize
from .expr import FUNCTIONS, Expr, ExprError, ExprSyntaxError, parse_expr
from .loader import bundled_rule_files, load_rules, loads_rules, validate_rule_files
from .schema import CONTEXT_NAMES, SCOPES, SEVERITIES, Rule, RuleSet
from .verdicts import VERDICTS

__all__ = [
    "CONTEXT_NAMES",
    "FAIL_ON",
    "FUNCTIONS",
    "SCOPES",
    "SEVERITIES",
    "VERDICTS",
    "Expr",
    "ExprError",
    "ExprSyntaxError",
    "Outcome",
    "Rule",
    "RuleSet",
    "Subject",
    "bundled_rule_files",
    "evaluate",
    "gate",
    "load_rules",
    "loads_rules",
    "parse_expr",
    "severity_rank",
    "summarize",
    "validate_rule_files",
]
