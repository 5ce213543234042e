"""hallway-audit: pre-flight diagnostics for fine-tuning and low-precision training.

The public API: `audit()` runs the whole audit and returns an `AuditResult`;
the registries (`get_format`, `open_checkpoint`, `load_rules`, `get_formatter`)
are the extension points.
"""

__version__ = "0.3.0"

from . import _startup  # noqa: F401  first: in the CLI, an interrupt while torch imports is one line
from .audit import AuditResult, CheckpointSummary, DynamicPlan, Gate, audit
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .distributed import audit_distributed
from .errors import (
    CheckpointError,
    ExitCode,
    HallwayError,
    OutputError,
    ResourceError,
    RuleFileError,
    UsageError,
)
from .lattice import Format, Lattice, get_format, list_formats
from .memory import MemoryEstimate, estimate_memory
from .metrics import METRICS, Metric
from .model.placement import PlacementSpec
from .plan import AuditPlan, build_plan
from .probe import BurstOptions, DynamicResult, Setting, SettingResult, SweepSpec
from .recommend import Recommendation
from .report import get_formatter
from .rules import Outcome, RuleSet, Subject, evaluate, load_rules
from .static import StaticPartial, StaticResult, audit_tensors, merge_partials, plan_static, run_static

__all__ = [
    "METRICS",
    "AuditPlan",
    "AuditResult",
    "BurstOptions",
    "Checkpoint",
    "CheckpointError",
    "CheckpointSummary",
    "DynamicPlan",
    "DynamicResult",
    "ExitCode",
    "Format",
    "Gate",
    "HallwayError",
    "Lattice",
    "MemoryEstimate",
    "Metric",
    "Outcome",
    "OutputError",
    "PlacementSpec",
    "Recommendation",
    "ResourceError",
    "RuleFileError",
    "RuleSet",
    "Setting",
    "SettingResult",
    "StaticPartial",
    "StaticResult",
    "Subject",
    "SweepSpec",
    "TensorInfo",
    "UsageError",
    "__version__",
    "audit",
    "audit_distributed",
    "audit_tensors",
    "build_plan",
    "estimate_memory",
    "evaluate",
    "get_format",
    "get_formatter",
    "list_formats",
    "load_rules",
    "merge_partials",
    "open_checkpoint",
    "plan_static",
    "run_static",
]
