"""The plan from files: a plan YAML (the CLI's keys, for CI) or a PEFT adapter_config.json.

Both are untrusted input, read with `safe_load` (regular files only, size and
YAML expansion bounded). A PEFT config is translated into plan keys here; a PEFT
key the audit cannot honour (DoRA, alpha_pattern, modules_to_save, ...) is
refused with its name, never silently dropped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import UsageError
from ..safe_load import (
    MAX_PLAN_BYTES_ENV,
    FileProblem,
    load_json_text,
    load_yaml_text,
    max_plan_bytes,
    read_text,
)
from .settings import SweepSpec


def load_plan(path: str | os.PathLike[str]) -> dict[str, object]:
    """A plan YAML: a mapping of option names (as on the command line) to values or lists.

    Only read and parsed here; `hallway_audit.plan.build_plan` validates the values.
    """
    try:
        text = read_text(path, what="plan file", limit=max_plan_bytes(), limit_env=MAX_PLAN_BYTES_ENV)
        data = load_yaml_text(text, "plan YAML")
    except FileProblem as exc:
        raise UsageError(exc.at(str(path))) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a plan is a mapping of option names to values, not a {type(data).__name__}")
    return data


# --- PEFT adapter_config.json ----------------------------------------------------------------

# Keys that describe the adapter's context, not what it trains: accepted with any value.
PEFT_INFORMATIONAL = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "megatron_core", "qalora_group_size", "runtime_config",
    "lora_dropout",  # the audit measures in evaluation mode: dropout is off, the subspace is the same
    "fan_in_fan_out",  # the weight layout of GPT-2's Conv1D; the audit adapts nn.Linear weights
})
# Keys accepted only at PEFT's default (besides null, false and empty values).
PEFT_DEFAULTS: dict[str, object] = {"bias": "none", "init_lora_weights": True}
# Why a key the audit cannot honour is refused (any other non-empty key: "not modelled").
PEFT_REASONS = {
    "use_dora": "DoRA's magnitude vector is not modelled",
    "alpha_pattern": "a per-module alpha is not modelled (fold it into lora_alpha or rank_pattern)",
    "modules_to_save": "fully trained extra modules are not modelled",
    "layers_to_transform": "restricting the layers is not modelled (name them in target_modules instead)",
    "layers_pattern": "restricting the layers is not modelled (name them in target_modules instead)",
    "exclude_modules": "excluded modules are not modelled (name the modules to adapt in target_modules)",
    "bias": "trained biases are not modelled (only bias: none)",
    "lora_bias": "a trained LoRA bias is not modelled",
    "init_lora_weights": "only PEFT's default initialisation (B = 0, A Kaiming-uniform) is modelled",
    "use_qalora": "QALoRA's pooled adapters are not modelled",
    "layer_replication": "replicated layers are not modelled",
    "target_parameters": "adapting parameters other than linear weights is not modelled",
    "trainable_token_indices": "trained embedding rows are not modelled",
}
PEFT_HONOURED = ("r", "target_modules", "lora_alpha", "use_rslora", "rank_pattern")


@dataclass
class PeftPlan:
    """Plan keys read from an adapter_config.json, and where each came from (for messages)."""

    path: str
    values: dict[str, object] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    targets_unset: bool = False  # target_modules null: PEFT would pick per-architecture defaults


def _empty(value: object) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and not value)


def peft_targets(target_modules: object, where: str = "target_modules") -> str:
    """PEFT's target_modules as --targets: 'all-linear', a list of name suffixes, or a
    regex that PEFT full-matches against module names."""
    from ..plan.values import fail, targets

    if target_modules == "all-linear":
        return "all-linear"
    if isinstance(target_modules, str):
        return targets(rf"\A(?:{target_modules})\Z", where)  # PEFT: re.fullmatch(target_modules, name)
    if not isinstance(target_modules, (list, tuple)) or not target_modules:
        fail(where, "a non-empty list of module names, a regex string, or 'all-linear'", target_modules)
    names = []
    for t in target_modules:
        if not isinstance(t, str) or not t.strip() or len(t) > 256:
            fail(where, "module names (non-empty strings of at most 256 characters)", t)
        names.append(re.escape(t.strip()))
    return targets(rf"(^|\.)({'|'.join(names)})$", where)


def read_peft_config(path: str | os.PathLike[str]) -> PeftPlan:
    """r, target_modules, lora_alpha, use_rslora and rank_pattern as plan keys; every
    other key must be one the audit can ignore, or at its default."""
    from ..plan.values import adapter_rank, boolean, number, rank_pattern, show

    p = str(path)
    try:
        text = read_text(path, what="PEFT config", limit=max_plan_bytes(), limit_env=MAX_PLAN_BYTES_ENV)
        cfg = load_json_text(text)
    except FileProblem as exc:
        raise UsageError(exc.at(p) + (" (expected PEFT's adapter_config.json)" if "JSON" in exc.message else "")) from None
    if not isinstance(cfg, dict) or "r" not in cfg:
        raise UsageError(f"{p}: not a LoRA adapter_config.json (no 'r')")
    kind = cfg.get("peft_type", "LORA")
    if not isinstance(kind, str) or kind.upper() != "LORA":
        raise UsageError(f"{p}: peft_type {show(kind)} is not supported (only LORA)")
    for key, value in cfg.items():
        if key in PEFT_HONOURED or key in PEFT_INFORMATIONAL:
            continue
        if key in PEFT_DEFAULTS and value == PEFT_DEFAULTS[key] and type(value) is type(PEFT_DEFAULTS[key]):
            continue
        if not _empty(value) or key in PEFT_DEFAULTS:
            reason = PEFT_REASONS.get(key, "the audit does not model this key")
            raise UsageError(f"{p}: {key}: {show(value)} cannot be honoured: {reason}; remove it to audit plain LoRA")
    out = PeftPlan(p)

    def put(key: str, value: object, peft_key: str) -> None:
        out.values[key] = value
        out.where[key] = f"{p}: {peft_key}"

    put("rank", [adapter_rank(cfg["r"], f"{p}: r")], "r")
    if cfg.get("target_modules") is None:
        out.targets_unset = True
    else:
        put("targets", peft_targets(cfg["target_modules"], f"{p}: target_modules"), "target_modules")
    if cfg.get("lora_alpha") is not None:
        put("alpha", number(cfg["lora_alpha"], f"{p}: lora_alpha"), "lora_alpha")
    if "use_rslora" in cfg:
        put("rslora", boolean(cfg["use_rslora"], f"{p}: use_rslora"), "use_rslora")
    if cfg.get("rank_pattern") is not None:
        patterns = rank_pattern(cfg["rank_pattern"], f"{p}: rank_pattern")
        if patterns:
            put("rank_pattern", patterns, "rank_pattern")
    return out


def apply_peft_config(spec: SweepSpec, path: str | os.PathLike[str]) -> SweepSpec:
    """r, target_modules, lora_alpha, use_rslora and rank_pattern from adapter_config.json onto `spec`."""
    peft = read_peft_config(path)
    if peft.targets_unset:
        peft.values["targets"] = "all-linear"  # the library call has no other source of targets
    for key, value in peft.values.items():
        setattr(spec, key, value)
    return spec
