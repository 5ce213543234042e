"""The library entry point: audit(checkpoint) -> AuditResult. The CLI is a thin layer over it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import open_checkpoint
from .distributed.ranked import HandedOver, worker_rank
from .distributed.ranked import active as active_ranks
from .distributed.static_split import merged_static, static_share
from .errors import ExitCode, UsageError
from .memory import check_memory, sweep_memory
from .plan import DEFAULT_FORMATS as DEFAULT_FORMATS  # re-exported: hallway_audit.audit's public names
from .plan import DEFAULT_LR as DEFAULT_LR
from .plan import AuditPlan, DynamicPlan, resolve_plan
from .plan.fit import check_ranks_fit
from .probe import DynamicResult, resolve_device, run_sweep
from .probe.burst import BurstProgress
from .recommend import Recommendation, recommend
from .rules import FAIL_ON as FAIL_ON
from .rules import Outcome, RuleSet, evaluate, load_rules, severity_rank
from .rules.loader import rule_resolution_notes
from .scope import FormatScope, format_scope, guessed_linear_layers, quantized_linear_layers
from .static import StaticResult, available_cpus, run_static
from .static.audit import Progress
from .static.partial import StaticPartial
from .subjects import FormatUpdates, dynamic_subjects, format_updates, static_subjects
from .threads import cpu_threads

if TYPE_CHECKING:  # the model package is imported only when a dynamic audit runs
    from .model import Batch, LoadedModel, LossFn



@dataclass(frozen=True)
class CheckpointSummary:
    path: str
    kind: str
    tensors: int
    params: int
    bytes: int


@dataclass(frozen=True)
class Gate:
    """The CI verdict. Findings of the checkpoint (static, or not tied to a probed
    setting) always gate. With a sweep of probed settings the question is whether
    the plan can train, so the dynamic part passes when at least one setting has no
    gating finding; findings of the other settings are reported, not gating."""

    passed: bool
    fail_on: str
    reason: str = ""
    waived: frozenset[str] = frozenset()  # probed settings whose findings do not gate

    @property
    def exit_code(self) -> int:
        return int(ExitCode.OK if self.passed else ExitCode.GATE_FAILED)

    def gates(self, outcome: Outcome) -> bool:
        """Does this outcome fail the gate (the JUnit failures, the exit code)?"""
        return (
            outcome.status == "fired"
            and self.fail_on != "never"
            and severity_rank(outcome.rule.severity) <= severity_rank(self.fail_on)
            and outcome.subject.setting not in self.waived
        )


def decide_gate(outcomes: list[Outcome], fail_on: str, dynamic: DynamicResult | None) -> Gate:
    probed = [r.id for r in dynamic.settings] if dynamic is not None else []
    if fail_on == "never":
        return Gate(True, fail_on, "--fail-on never")
    strict = Gate(False, fail_on)
    blocked = {o.subject.setting for o in outcomes if strict.gates(o)}
    checkpoint_fails = any(s not in probed for s in blocked)
    passing = [sid for sid in probed if sid not in blocked]
    if checkpoint_fails:
        return Gate(False, fail_on, f"findings at or above {fail_on} in the checkpoint")
    if probed and not passing:
        return Gate(False, fail_on, f"every probed setting has findings at or above {fail_on}")
    waived = frozenset(probed) if passing else frozenset()
    reason = f"{len(passing)} of {len(probed)} probed settings pass" if probed else f"no findings at or above {fail_on}"
    return Gate(True, fail_on, reason, waived)


@dataclass
class AuditResult:
    checkpoint: CheckpointSummary
    static: StaticResult
    ruleset: RuleSet
    outcomes: list[Outcome]
    gate: Gate
    notes: list[str] = field(default_factory=list)
    dynamic: DynamicResult | None = None
    recommendation: Recommendation | None = None
    updates: FormatUpdates | None = None  # how the plan updates each format's weights (subjects.py)

    @property
    def findings(self) -> list[Outcome]:
        """Fired rules, most severe first, then by layer and setting."""
        fired = [o for o in self.outcomes if o.status == "fired"]
        return sorted(
            fired,
            key=lambda o: (severity_rank(o.rule.severity), o.subject.layer or "", o.subject.setting or "", o.rule.id),
        )

    def to_dict(self) -> dict:
        from .report.schema import result_to_dict

        return result_to_dict(self)


def audit(
    checkpoint: str | os.PathLike,
    plan: AuditPlan | None = None,
    *,
    rules: Sequence[str | os.PathLike] | None = None,
    formats: Sequence[str] | None = None,
    lr: float | None = None,
    spectral: bool | None = None,
    fail_on: str | None = None,
    device: str | torch.device | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
    dynamic: DynamicPlan | None = None,
    burst_progress: BurstProgress | None = None,
) -> AuditResult:
    """Audit a checkpoint against rule files; raises a HallwayError subclass on bad input.

    `plan` is an AuditPlan from `build_plan` (the CLI's merge of flags, plan YAML
    and PEFT config); keyword arguments given override it. Without a plan the
    defaults are rules=("default.yaml",) (() for none), formats=("bf16",
    "fp8_e4m3"), lr=1e-4, spectral=False, fail_on="error", device="cpu", jobs=the
    CPUs available (static audit processes; the result is the same for any). Every
    value is checked as the CLI's are. Static figures always; with a DynamicPlan
    (a calibration batch, and an architecture from a Hugging Face directory or a
    --model factory) also probe bursts of every setting of the sweep, and a
    recommendation.
    """
    plan = resolve_plan(
        plan,
        {"rules": rules, "formats": formats, "lr": lr, "spectral": spectral, "fail_on": fail_on, "device": device,
         "dynamic": dynamic, "jobs": jobs},
        base=lambda: AuditPlan(device="cpu"),
    )
    dynamic, formats, lr, fail_on = plan.dynamic, plan.formats, plan.lr, plan.fail_on
    notes: list[str] = rule_resolution_notes(plan.rules)
    ruleset = load_rules(list(plan.rules))
    dev = resolve_device(str(plan.device)) if not isinstance(plan.device, torch.device) else plan.device
    settings = dynamic.sweep.settings() if dynamic is not None else []  # bad flags fail before any work
    # data, model and loss errors come before the static pass, not after it
    prepared = _prepare_dynamic(checkpoint, dynamic, dev) if dynamic is not None else None
    if prepared is not None:
        check_ranks_fit(prepared.loaded.module, settings)  # a rank no targeted layer can hold: before any burst
        assert dynamic is not None
        check_memory(sweep_memory(prepared.loaded.module, settings, dynamic.burst, prepared.train, prepared.val))
    # Under torchrun every rank measures a share of the tensors and probes a share of the
    # settings; rank 0 merges both (hallway_audit.distributed), the others stop (HandedOver).
    ranked = active_ranks() is not None
    own: StaticPartial | None = None
    with open_checkpoint(checkpoint) as ckpt:
        if ranked:
            own = static_share(ckpt, formats, lr, spectral=plan.spectral, device=dev, progress=progress)
        else:  # a small checkpoint is measured on one CPU thread, like a small model's bursts (threads.py)
            with cpu_threads(sum(i.numel for i in ckpt.infos()), dev):
                static = run_static(ckpt, formats, lr, spectral=plan.spectral, device=dev, progress=progress,
                                    jobs=plan.jobs if plan.jobs is not None else available_cpus())
        kind, infos = ckpt.kind, ckpt.infos()
    if worker_rank():
        if prepared is not None and dynamic is not None:
            with cpu_threads(sum(p.numel() for p in prepared.loaded.module.parameters()), dev):
                _run_dynamic(prepared, dynamic, settings, ruleset, burst_progress)  # hands both shares to rank 0
        raise HandedOver
    dyn_result = None
    if dynamic is None:
        notes.append("static audit only: pass --calib (and --model unless CHECKPOINT is a Hugging Face directory) for probe bursts; dynamic rules are skipped")
    else:
        assert prepared is not None
        params = sum(p.numel() for p in prepared.loaded.module.parameters())
        with cpu_threads(params, dev):
            dyn_result = _run_dynamic(prepared, dynamic, settings, ruleset, burst_progress)
        notes.extend(dyn_result.notes)
    if own is not None:
        static = merged_static(own)
    summary = CheckpointSummary(path=str(Path(checkpoint)), kind=kind, tensors=len(infos),
                                params=sum(i.numel for i in infos), bytes=static.bytes_read)
    static_rules = RuleSet(tuple(r for r in ruleset.rules if r.phase == "static"), ruleset.vars, ruleset.files)
    dynamic_rules = RuleSet(tuple(r for r in ruleset.rules if r.phase == "dynamic"), ruleset.vars, ruleset.files)
    updates = format_updates(formats, plan.master_weights, plan.rounding,
                             [r.setting for r in dyn_result.settings] if dyn_result is not None else None)
    outcomes = evaluate(static_rules, static_subjects(static, updates, _static_scope(static, plan.quantize, prepared)))
    outcomes += evaluate(dynamic_rules, dynamic_subjects(dyn_result) if dyn_result is not None else [])
    order = {r.id: i for i, r in enumerate(ruleset.rules)}
    outcomes.sort(key=lambda o: order[o.rule.id])
    recommendation = recommend(dyn_result, outcomes) if dyn_result is not None and dyn_result.settings else None
    return AuditResult(summary, static, ruleset, outcomes, decide_gate(outcomes, fail_on, dyn_result), notes, dyn_result,
                       recommendation, updates)


def _static_scope(static: StaticResult, quantize: str, prepared: _PreparedDynamic | None) -> FormatScope:
    """Which layers each format applies to under the plan's --quantize: from the model's
    linear layers when there is one, guessed from the checkpoint's names otherwise, and
    for checkpoint tensors the model names differently (transformers v5 fuses MoE experts
    stored one matrix per expert on disk into one stacked parameter)."""
    from .probe.targets import parameter_universe

    stored = [(layer.name, [t.shape for t in layer.tensors]) for layer in static.layers]
    if prepared is None:
        return format_scope(quantize, guessed_linear_layers(stored))
    universe = parameter_universe(prepared.loaded.module)
    named = {p.layer for p in universe}
    linear = quantized_linear_layers(universe) | guessed_linear_layers(s for s in stored if s[0] not in named)
    return format_scope(quantize, linear)


@dataclass
class _PreparedDynamic:
    """The model, batches and loss, built and checked before the static pass."""

    loaded: LoadedModel
    train: Batch
    val: Batch
    val_source: str
    loss_name: str
    loss_fn: LossFn


def _prepare_dynamic(checkpoint: str | os.PathLike, plan: DynamicPlan, device: torch.device) -> _PreparedDynamic:
    """Cheapest failures first: the loss spec, then the data (a tokenizer needs no model),
    then the model, then the loss on the data; all before the static pass and the burst."""
    from .model import build_model, load_calibration, resolve_loss, split_batch, user_loss, verify_loss
    from .model.data import TEXT_SUFFIXES
    from .model.hf import optional_tokenizer

    user = user_loss(plan.loss)
    # a user's loss or model reads the batch: any named tensors sharing the example dimension
    user_batch = user is not None or plan.model is not None
    files = [plan.calib] + ([plan.val] if plan.val is not None else [])
    tokenizer = None
    if any(Path(f).suffix.lower() in TEXT_SUFFIXES for f in files):
        with open_checkpoint(checkpoint) as ckpt:  # headers only
            kind, path = ckpt.kind, ckpt.path
        tokenizer = optional_tokenizer(path) if kind == "hf" else None

    def load(path: str) -> Batch:
        return load_calibration(path, tokenizer=tokenizer, max_length=plan.max_length, device=device, user_batch=user_batch)

    batch = load(plan.calib)
    if plan.val is not None:
        train, val = batch, load(plan.val)
        val_source = plan.val
    else:
        train, val = split_batch(batch, 0.25, plan.burst.seed)
        val_source = f"25% of {plan.calib} (seed {plan.burst.seed})"
    loaded = build_model(checkpoint, plan.model, device, placement=plan.placement)
    if loaded is None:
        raise UsageError(
            f"{checkpoint}: --calib needs an architecture: a Hugging Face directory (config.json beside the weights) "
            "or --model module:factory"
        )
    loss_name, loss_fn = user if user is not None else resolve_loss(plan.loss, loaded, train)
    verify_loss(
        loss_fn, loaded, train, val, name=loss_name, micro_batch=plan.burst.micro_batch,
        train_where=f"the calibration batch ({plan.calib})",
        val_where=f"the held-out batch ({plan.val})" if plan.val is not None else f"the held-out part of {plan.calib}",
    )
    return _PreparedDynamic(loaded, train, val, val_source, loss_name, loss_fn)


def _run_dynamic(
    prepared: _PreparedDynamic,
    plan: DynamicPlan,
    settings: list,
    ruleset: RuleSet,
    progress: BurstProgress | None,
) -> DynamicResult:
    psi_target = ruleset.vars.get("psi_target", plan.burst.psi_target)
    beta_floor = ruleset.vars.get("beta_floor", plan.burst.beta_floor)
    options = replace(plan.burst, psi_target=float(psi_target), beta_floor=float(beta_floor))  # type: ignore[arg-type]
    placement = prepared.loaded.placement
    try:
        result = run_sweep(
            prepared.loaded.module,
            settings=settings,
            loss_fn=prepared.loss_fn,
            loss_name=prepared.loss_name,
            train=prepared.train,
            val=prepared.val,
            options=options,
            model_source=prepared.loaded.source,
            calib=plan.calib,
            val_source=prepared.val_source,
            progress=progress,
        )
    finally:
        if placement is not None:
            placement.close()  # the offload folder: nothing reads the module after the sweep
    result.placement = placement.to_dict() if placement is not None else None
    return result
