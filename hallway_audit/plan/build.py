"""One plan for one audit run: defaults < plan YAML < PEFT config < explicit flags.

`build_plan` is what the CLI calls with the flags the user typed (and only those),
and what a library user calls to get the same merge and the same checks; `audit()`
takes its result. Every value is validated where it enters (plan/values.py), so
each error names its source: `--steps`, `plan.yaml: steps` or
`adapter_config.json: r`. Then the plan as a whole is checked: flags that would
do nothing (dynamic-only keys without --calib, several --lr in a static run),
contradictions (--rules with --no-rules), and code named by a plan file, which
is imported only with trust_code=True (--trust-plan-code).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..probe.burst import BurstOptions
from ..probe.horizon import Schedule
from ..probe.settings import SweepSpec
from .values import KEYS, MAX_SETTINGS_DEFAULT, MAX_SETTINGS_ENV, Key, canonical_key, check_value, show

if TYPE_CHECKING:
    from ..model import LossFn
    from ..model.placement import PlacementSpec

DEFAULT_FORMATS = ("bf16", "fp8_e4m3")
DEFAULT_LR = 1e-4
DEFAULT_RULES = ("default.yaml",)

# The values a key takes when no source gives it (the CLI shows these as its defaults).
DEFAULTS: dict[str, object] = {
    "precision": list(DEFAULT_FORMATS),
    "lr": [DEFAULT_LR],
    "fail_on": "error",
    "device": "auto",
    "spectral": False,
    "targets": "all-linear",
    "rslora": False,
    "steps": BurstOptions.steps,
    "samples": BurstOptions.samples,
    "p_every": BurstOptions.p_every,
    "sigma": BurstOptions.sigma,
    "micro_batch": BurstOptions.micro_batch,
    "eval_batch": BurstOptions.eval_batch,
    "seed": BurstOptions.seed,
    "max_length": 128,
    "train_steps": Schedule.steps,
    "schedule": Schedule.kind,
    "warmup": Schedule.warmup,
    "lr_min": Schedule.lr_min,
    "master_weights": SweepSpec().master_weights,
    "rounding": SweepSpec().rounding,
}


@dataclass
class DynamicPlan:
    """What the dynamic audit needs beyond the checkpoint: data, and the settings to probe."""

    calib: str
    model: str | None = None  # --model module:factory or file.py:factory; None: the HF directory's architecture
    val: str | None = None  # None: a deterministic 25% split of calib
    loss: str | LossFn | None = None  # a name, module:function, or fn(model, batch) -> scalar; None: chosen
    sweep: SweepSpec = field(default_factory=SweepSpec)
    burst: BurstOptions = field(default_factory=BurstOptions)
    max_length: int = 128
    placement: PlacementSpec | None = None  # --device-map / --max-memory: spread over devices by accelerate


@dataclass(frozen=True)
class AuditPlan:
    """Everything one audit run does, validated: what `audit(checkpoint, plan)` runs.

    rules: bundled names or paths; () evaluates no rules. formats and lr: what the
    static audit measures (lr: the first planned learning rate). dynamic: the probe
    bursts, None for a static-only audit.
    """

    rules: tuple[str, ...] = DEFAULT_RULES
    formats: tuple[str, ...] = DEFAULT_FORMATS
    lr: float = DEFAULT_LR
    spectral: bool = False
    fail_on: str = "error"
    device: str = "auto"
    dynamic: DynamicPlan | None = None
    jobs: int | None = None  # static audit processes; None: the CPUs available (static.available_cpus)
    quantize: str = "auto"  # which layers a coarse format applies to (scope.format_scope), static rules too
    # a static-only run's plan for the weights' updates: with fp32 master weights sub-ULP steps
    # accumulate, so the static "cannot move" rules apply only to formats planned without them
    master_weights: tuple[str, ...] = ("fp32",)
    # likewise --rounding: stochastic rounding moves a sub-ULP step with probability |step|/ULP
    rounding: tuple[str, ...] = ("nearest",)


@dataclass
class _Layer:
    """The validated keys of one source, and how to name each in a message."""

    name: str  # 'command line', 'plan.yaml', 'adapter_config.json', 'audit()'
    values: dict[str, object] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    is_file: bool = False


def _flag_layer(flags: Mapping[str, object], name: str = "command line") -> _Layer:
    layer = _Layer(name)
    for raw, value in flags.items():
        key = canonical_key(raw, name)
        where = Key.flag(key) if name == "command line" else f"{name}: {key}"
        layer.values[key] = check_value(key, value, where)
        layer.where[key] = where
    return layer


def _file_layer(path: str | os.PathLike[str]) -> _Layer:
    from ..probe.plan import load_plan

    name = str(path)
    layer = _Layer(name, is_file=True)
    for raw, value in load_plan(path).items():
        key = canonical_key(raw, name)
        where = f"{name}: {raw}"
        if key in layer.values:
            raise UsageError(f"{where}: the key is given twice (as {key!r} and {key.replace('_', '-')!r})")
        layer.values[key] = check_value(key, value, where)
        layer.where[key] = where
    return layer


def _check_rules_choice(layer: _Layer) -> None:
    if layer.values.get("no_rules") is True and "rules" in layer.values:
        if layer.is_file or layer.name != "command line":
            raise UsageError(f"{layer.name}: rules and no_rules: true contradict each other")
        raise UsageError("--no-rules and --rules contradict each other: give one")


@dataclass
class _Merged:
    values: dict[str, object] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # how to name the key's value in a message
    origin: dict[str, _Layer] = field(default_factory=dict)  # the source it came from


def _merge(layers: Sequence[_Layer]) -> _Merged:
    merged = _Merged()
    for layer in layers:
        _check_rules_choice(layer)
        if "rules" in layer.values:  # a later source choosing rule files overrides an earlier no_rules
            merged.values.pop("no_rules", None)
        if layer.values.get("no_rules") is True:
            merged.values.pop("rules", None)
        for key, value in layer.values.items():
            merged.values[key] = value
            merged.where[key] = layer.where[key]
            merged.origin[key] = layer
    return merged


def _needs_calib(where: str, is_flag: bool) -> UsageError:
    fix = "add --calib FILE" if is_flag else "add calib: FILE to the plan or --calib FILE"
    return UsageError(f"{where} is for the dynamic audit (probe bursts): {fix}")


def names_code(key: str, value: object) -> bool:
    """Does a plan's model/loss value name code to import? (a built-in loss name does not)."""
    if key == "model":
        return True
    return key == "loss" and isinstance(value, str) and ":" in value


def _check_trust(merged: _Merged, trust_code: bool) -> None:
    if trust_code:
        return
    for key in ("model", "loss"):
        if key in merged.values and merged.origin[key].is_file and names_code(key, merged.values[key]):
            raise UsageError(
                f"{merged.where[key]}: {show(merged.values[key])} names code to import and run; a plan file runs "
                f"code only with --trust-plan-code (build_plan(trust_code=True)), or give --{key} on the command line"
            )


def _grid_size(spec: SweepSpec) -> int:
    return math.prod(len(v) for v in (spec.precision, spec.act_precision, spec.rounding, spec.master_weights,
                                       spec.rank, spec.sparsity, spec.lr, spec.optimizer))


def check_grid(spec: SweepSpec, where: str = "the sweep") -> None:
    """Refuse a grid of more settings than HALLWAY_AUDIT_MAX_SETTINGS before building it."""
    from ..limits import env_int

    limit = env_int(MAX_SETTINGS_ENV, MAX_SETTINGS_DEFAULT)
    size = _grid_size(spec)
    if size > limit:
        raise UsageError(
            f"{where}: the lists make {size} settings, more than the limit of {limit} "
            f"(each is a probe burst; set {MAX_SETTINGS_ENV} to raise it)"
        )


def build_plan(
    flags: Mapping[str, object] | None = None,
    plan_file: str | os.PathLike[str] | None = None,
    peft_config: str | os.PathLike[str] | None = None,
    *,
    trust_code: bool = False,
) -> AuditPlan:
    """Merge defaults < plan YAML < PEFT config < `flags`, validate, and return the plan.

    `flags` holds only the options the user gave explicitly (plan key names, such
    as 'steps' or 'no_rules'; values as typed or as Python values). Raises a
    UsageError (exit 2) naming the key and its source for any bad value.
    """
    layers: list[_Layer] = []
    if plan_file is not None:
        layers.append(_file_layer(plan_file))
    peft = None
    if peft_config is not None:
        from ..probe.plan import read_peft_config

        peft = read_peft_config(peft_config)
        layers.append(_Layer(peft.path, dict(peft.values), dict(peft.where), is_file=True))
    command_line = _flag_layer(flags or {})
    layers.append(command_line)
    merged = _merge(layers)
    _check_trust(merged, trust_code)
    values, where = merged.values, merged.where
    if values.get("calib") is None:
        for layer in reversed(layers):  # what the user typed first, then the files
            for key in layer.values:
                if KEYS[key].dynamic and merged.origin.get(key) is layer:
                    raise _needs_calib(layer.where[key], layer is command_line)
        if peft is not None:
            raise UsageError(f"{peft.path}: a PEFT config is for the dynamic audit (probe bursts): add --calib FILE")
        lrs = values.get("lr", DEFAULTS["lr"])
        assert isinstance(lrs, list)
        if len(lrs) > 1:
            raise UsageError(
                f"{where['lr']}: the static audit uses one learning rate, got {len(lrs)} "
                "(a sweep of learning rates needs --calib)"
            )
    if peft is not None and peft.targets_unset and "targets" not in command_line.values:
        raise UsageError(
            f"{peft.path}: target_modules is null: PEFT would pick the architecture's default modules, which the "
            "audit does not know; name them in target_modules (or 'all-linear'), or pass --targets"
        )
    return _assemble(values, where)


def _get(values: Mapping[str, object], key: str) -> object:
    return values[key] if key in values else DEFAULTS.get(key)


def _assemble(values: Mapping[str, object], where: Mapping[str, str]) -> AuditPlan:
    formats = _get(values, "precision")
    lrs = _get(values, "lr")
    assert isinstance(formats, list) and isinstance(lrs, list)
    dynamic = None
    if values.get("calib") is not None:
        sweep = SweepSpec(precision=list(formats), lr=list(lrs))
        for key in ("act_precision", "rounding", "master_weights", "rank", "targets", "alpha", "rslora",
                    "rank_pattern", "sparsity", "optimizer", "lora_base", "quantize", "adapter_precision"):
            if key in values:
                setattr(sweep, key, values[key])
        schedule = Schedule(
            kind=str(_get(values, "schedule")),  # type: ignore[arg-type]
            steps=int(_get(values, "train_steps")),  # type: ignore[call-overload]
            warmup=int(_get(values, "warmup")),  # type: ignore[call-overload]
            lr_min=float(_get(values, "lr_min")),  # type: ignore[arg-type]
        )
        if schedule.warmup >= schedule.steps:
            raise UsageError(f"{where.get('warmup', 'warmup')}: the warmup ({schedule.warmup} steps) must be shorter "
                             f"than the run (train_steps {schedule.steps})")
        if schedule.lr_min > min(lrs):
            raise UsageError(f"{where.get('lr_min', 'lr_min')}: lr_min {schedule.lr_min:g} is above the planned lr {min(lrs):g}")
        check_grid(sweep, where.get("rank", "the sweep") if "rank" in where else "the sweep")
        burst = BurstOptions(
            steps=int(_get(values, "steps")),  # type: ignore[call-overload]
            samples=int(_get(values, "samples")),  # type: ignore[call-overload]
            p_every=int(_get(values, "p_every")),  # type: ignore[call-overload]
            sigma=float(_get(values, "sigma")),  # type: ignore[arg-type]
            micro_batch=int(_get(values, "micro_batch")),  # type: ignore[call-overload]
            eval_batch=int(_get(values, "eval_batch")),  # type: ignore[call-overload]
            seed=int(_get(values, "seed")),  # type: ignore[call-overload]
            per_layer_p=bool(values.get("per_layer_p", False)),
            early_stop=not values.get("no_early_stop", False),
            schedule=schedule,
        )
        dynamic = DynamicPlan(
            calib=str(values["calib"]),
            model=values.get("model"),  # type: ignore[arg-type]
            val=values.get("val"),  # type: ignore[arg-type]
            loss=values.get("loss"),  # type: ignore[arg-type]
            sweep=sweep,
            burst=burst,
            max_length=int(_get(values, "max_length")),  # type: ignore[call-overload]
            placement=_placement(values, where),
        )
    rules: tuple[str, ...] = () if values.get("no_rules") else tuple(values.get("rules", DEFAULT_RULES))  # type: ignore[arg-type]
    return AuditPlan(
        rules=rules,
        formats=tuple(formats),
        lr=float(lrs[0]),
        spectral=bool(values.get("spectral", False)),
        jobs=values.get("jobs"),  # type: ignore[arg-type]
        quantize=str(values.get("quantize", "auto")),
        master_weights=tuple(_get(values, "master_weights")),  # type: ignore[arg-type]
        rounding=tuple(_get(values, "rounding")),  # type: ignore[arg-type]
        fail_on=str(_get(values, "fail_on")),
        device=str(_get(values, "device")),
        dynamic=dynamic,
    )


def _placement(values: Mapping[str, object], where: Mapping[str, str]) -> PlacementSpec | None:
    """--device-map with its --max-memory budget; a budget alone places nothing."""
    if "device_map" not in values:
        if "max_memory" in values:
            raise UsageError(f"{where['max_memory']} is the budget of --device-map: add --device-map auto (or balanced)")
        return None
    from ..model.placement import PlacementSpec

    budget = values.get("max_memory") or {}
    assert isinstance(budget, dict)
    return PlacementSpec(str(values["device_map"]), tuple(budget.items()))


# --- plans built in Python: the same checks ----------------------------------------------------


def check_dynamic(dynamic: DynamicPlan, where: str = "dynamic") -> None:
    """Validate a DynamicPlan built in Python with the checks the CLI's values get."""
    if not isinstance(dynamic, DynamicPlan):
        raise UsageError(f"{where}: expected a DynamicPlan, got {type(dynamic).__name__}")
    check_value("calib", dynamic.calib, f"{where}.calib")
    for key in ("model", "val"):
        if getattr(dynamic, key) is not None:
            check_value(key, getattr(dynamic, key), f"{where}.{key}")
    if isinstance(dynamic.loss, str):
        check_value("loss", dynamic.loss, f"{where}.loss")
    elif dynamic.loss is not None and not callable(dynamic.loss):
        raise UsageError(f"{where}.loss: expected a loss name, module:function or a function, got {show(dynamic.loss)}")
    check_value("max_length", dynamic.max_length, f"{where}.max_length")
    if dynamic.placement is not None:
        from ..model.placement import PlacementSpec

        p = dynamic.placement
        if not isinstance(p, PlacementSpec):
            raise UsageError(f"{where}.placement: expected a PlacementSpec, got {show(p)}")
        check_value("device_map", p.device_map, f"{where}.placement.device_map")
        if p.max_memory:
            check_value("max_memory", dict(p.max_memory), f"{where}.placement.max_memory")
    s = dynamic.sweep
    for key in ("precision", "act_precision", "rounding", "master_weights", "rank", "targets", "rslora",
                "rank_pattern", "lr", "optimizer"):
        value = getattr(s, key)
        if key == "act_precision":
            value = ["none" if v is None else v for v in value] if isinstance(value, list) else value
        check_value(key, value, f"{where}.sweep.{key}")
    if s.alpha is not None:
        check_value("alpha", s.alpha, f"{where}.sweep.alpha")
    if not isinstance(s.sparsity, list) or not s.sparsity:
        raise UsageError(f"{where}.sweep.sparsity: expected a non-empty list of (fraction, mask), got {show(s.sparsity)}")
    check_grid(s, f"{where}.sweep")
    b = dynamic.burst
    for key in ("steps", "samples", "p_every", "sigma", "micro_batch", "eval_batch", "seed"):
        check_value(key, getattr(b, key), f"{where}.burst.{key}")
    for key in ("per_layer_p", "early_stop"):
        check_value("spectral", getattr(b, key), f"{where}.burst.{key}")  # a bool


def resolve_plan(plan: AuditPlan | None, overrides: Mapping[str, object], base: Callable[[], AuditPlan]) -> AuditPlan:
    """`audit()`'s arguments: a plan (or `base()`), with the keyword arguments given overriding it; all checked."""
    if plan is not None and not isinstance(plan, AuditPlan):
        raise UsageError(f"audit(): plan must be an AuditPlan (from build_plan), got {type(plan).__name__}")
    result = plan if plan is not None else base()
    changes: dict[str, object] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "rules":  # a str is one spec; a pathlib.Path is always a path (rules/loader.py)
            specs = [value] if isinstance(value, (str, os.PathLike)) else list(value)  # type: ignore[call-overload]
            changes[key] = tuple(specs)
        elif key == "formats":
            changes[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        else:
            changes[key] = value
    result = replace(result, **changes) if changes else result  # type: ignore[arg-type]
    check_plan(result, {key: f"audit(): {key}" for key in changes})
    return result


def check_plan(plan: AuditPlan, names: Mapping[str, str] | None = None) -> None:
    """Validate an AuditPlan however it was built (a dataclass is easy to fill by hand).

    `names`: how to call a field in a message (default 'plan.<field>').
    """
    def name(field_name: str) -> str:
        return (names or {}).get(field_name, f"plan.{field_name}")

    rules = plan.rules
    if not isinstance(rules, tuple) or any(not isinstance(r, (str, Path)) for r in rules):
        raise UsageError(f"{name('rules')}: expected rule file names or paths, got {show(rules)}")
    for spec in rules:
        if isinstance(spec, str):
            check_value("rules", spec, name("rules"))
    check_value("precision", list(plan.formats) if isinstance(plan.formats, tuple) else plan.formats, name("formats"))
    check_value("lr", plan.lr, name("lr"))
    check_value("spectral", plan.spectral, name("spectral"))
    if plan.jobs is not None:
        check_value("jobs", plan.jobs, name("jobs"))
    check_value("fail_on", plan.fail_on, name("fail_on"))
    check_value("master_weights", list(plan.master_weights) if isinstance(plan.master_weights, tuple)
                else plan.master_weights, name("master_weights"))
    check_value("rounding", list(plan.rounding) if isinstance(plan.rounding, tuple) else plan.rounding,
                name("rounding"))
    if isinstance(plan.device, str):
        check_value("device", plan.device, name("device"))
    if plan.dynamic is not None:
        check_dynamic(plan.dynamic, name("dynamic"))
