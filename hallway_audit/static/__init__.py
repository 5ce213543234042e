"""The static audit: figures from the weights alone, no data, no architecture
(docs/definitions.md §3)."""

from .audit import audit_tensors, audit_units, available_cpus, run_static
from .partial import StaticPartial, merge_partials
from .plan import StaticPlan, plan_static
from .result import LayerResult, StaticResult, TensorEntry
from .spectral import spectral_figures
from .tally import FormatTally, Tally

__all__ = [
    "FormatTally",
    "LayerResult",
    "StaticPartial",
    "StaticPlan",
    "StaticResult",
    "Tally",
    "TensorEntry",
    "audit_tensors",
    "audit_units",
    "available_cpus",
    "merge_partials",
    "plan_static",
    "run_static",
    "spectral_figures",
]
