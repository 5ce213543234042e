"""hallway-audit: pre-flight diagnostics for fine-tuning and low-precision training.

The public API: `audit()` runs the whole audit and returns an `AuditResult`;
the registries (`get_format`, `open_checkpoint`, `load_rules`, `get_formatter`)
are the extension points.
"""

__version__ = "0.3.0"

from .audit import AuditResult, CheckpointSummary, DynamicPlan, Gate, audit  # noqa: E402
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ExitCode,
    HallwayError,
    OutputError,
    ResourceError,
    RuleFileError,
    UsageError,
)
from .lattice import Format, Lattice, get_format, list_formats  # noqa: E402
from .metrics import METRICS, Metric  # noqa: E402
from .probe import BurstOptions, DynamicResult, Setting, SettingResult, SweepSpec  # noqa: E402
from .recommend import Recommendation  # noqa: E402
from .report import get_formatter  # noqa: E402
from .rules import Outcome, RuleSet, Subject, evaluate, load_rules  # noqa: E402
from .static import StaticResult, run_static  # noqa: E402

__all__ = [
    "METRICS",
    "AuditResult",
    "BurstOptions",
    "DynamicPlan",
    "DynamicResult",
    "Recommendation",
    "Setting",
    "SettingResult",
    "SweepSpec",
    "Checkpoint",
    "CheckpointError",
    "CheckpointSummary",
    "ExitCode",
    "Format",
    "Gate",
    "HallwayError",
    "Lattice",
    "Metric",
    "Outcome",
    "OutputError",
    "ResourceError",
    "RuleFileError",
    "RuleSet",
    "StaticResult",
    "Subject",
    "TensorInfo",
    "UsageError",
    "__version__",
    "audit",
    "evaluate",
    "get_format",
    "get_formatter",
    "list_formats",
    "load_rules",
    "open_checkpoint",
    "run_static",
]
