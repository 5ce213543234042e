"""The plan of an audit run: one merge of defaults, plan YAML, PEFT config and flags,
one validation layer for every value, and the trust boundary for code a plan names."""

from .build import (
    DEFAULT_FORMATS,
    DEFAULT_LR,
    DEFAULTS,
    AuditPlan,
    DynamicPlan,
    build_plan,
    check_dynamic,
    check_plan,
    resolve_plan,
)
from .values import KEYS, check_value

__all__ = [
    "DEFAULTS",
    "DEFAULT_FORMATS",
    "DEFAULT_LR",
    "KEYS",
    "AuditPlan",
    "DynamicPlan",
    "build_plan",
    "check_dynamic",
    "check_plan",
    "check_value",
    "resolve_plan",
]
