"""The dynamic audit: probe bursts of real optimizer steps under each setting
(docs/definitions.md §4 to §6)."""

from .burst import BurstOptions, run_burst
from .plan import apply_peft_config, load_plan
from .result import LayerDynamics, SettingResult, StepRecord
from .settings import OptimizerSpec, PrecisionStack, Setting, Subspace, SweepSpec, from_mapping
from .stats import wilson_interval
from .sweep import DynamicResult, resolve_device, run_sweep

__all__ = [
    "BurstOptions",
    "DynamicResult",
    "LayerDynamics",
    "OptimizerSpec",
    "PrecisionStack",
    "Setting",
    "SettingResult",
    "StepRecord",
    "Subspace",
    "SweepSpec",
    "apply_peft_config",
    "from_mapping",
    "load_plan",
    "resolve_device",
    "run_burst",
    "run_sweep",
    "wilson_interval",
]
