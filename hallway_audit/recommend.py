"""The practitioner rule as a choice: the lowest rank and coarsest precision that pass.

Among the probed settings, those with no fired error rule are candidates; the
recommendation is the one with the lowest rank (full fine-tuning ranks last), then
the fewest bits, then sweep order. Per-layer overrides plug into tools: a PEFT
rank_pattern (r_star rounded up to a power of two) for the layers whose gradient
escapes the planned rank, and the modules to keep in a finer format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .probe import DynamicResult, SettingResult
from .rules import Outcome


@dataclass(frozen=True)
class Recommendation:
    setting: str | None  # id of the recommended setting; None when none passes
    reason: str
    focus: str | None  # the setting whose layers the report details (recommended, or the closest to passing)
    base_rank: int | None = None  # the rank rank_pattern overrides (LoraConfig(r=base_rank, rank_pattern=...))
    rank_pattern: dict[str, int] = field(default_factory=dict)
    keep_finer: list[str] = field(default_factory=list)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _order(result: SettingResult) -> tuple:
    s = result.setting
    rank = s.subspace.rank if s.subspace.kind == "lora" else math.inf
    return (rank, s.bits, -s.subspace.sparsity)


def recommend(dynamic: DynamicResult, outcomes: list[Outcome]) -> Recommendation:
    errors: dict[str, int] = {r.id: 0 for r in dynamic.settings}
    global_errors = 0
    for o in outcomes:
        if o.status != "fired" or o.rule.severity != "error":
            continue
        if o.subject.setting in errors:
            errors[o.subject.setting] += 1
        elif o.subject.setting is None:
            global_errors += 1
    results = {r.id: r for r in dynamic.settings}
    passing = [r for r in dynamic.settings if errors[r.id] == 0 and not global_errors]
    if passing:
        chosen = min(passing, key=_order)
        reason = "lowest rank, then coarsest precision, among the settings that pass every error rule"
        focus = chosen
    else:
        chosen = None
        reason = "no probed setting passes every error rule" + (" (the checkpoint itself has errors)" if global_errors else "")
        focus = min(dynamic.settings, key=lambda r: (errors[r.id], _order(r)))
    # rank_pattern from the cheapest LoRA setting whose gradient escapes its rank:
    # raising only those layers is the cheaper alternative to a higher global rank.
    escaping: dict[str, set[str]] = {}
    finer: dict[str, set[str]] = {}
    for o in outcomes:
        if o.status != "fired" or o.subject.layer is None or o.subject.setting not in results:
            continue
        if o.rule.verdict == "needs_higher_rank":
            escaping.setdefault(o.subject.setting, set()).add(o.subject.layer)
        if o.rule.verdict in ("needs_finer_precision", "stochastic_rounding", "raise_lr", "fp32_master_weights"):
            finer.setdefault(o.subject.setting, set()).add(o.subject.layer)
    rank_pattern: dict[str, int] = {}
    base_rank = None
    lora_escaping = [results[sid] for sid in escaping if results[sid].setting.subspace.kind == "lora"]
    if lora_escaping:
        source = min(lora_escaping, key=_order)
        base_rank = source.setting.subspace.rank
        for layer in sorted(escaping[source.id]):
            r = source.layers[layer].r_star
            if r is not None and r > (source.layers[layer].planned_rank or 0):
                rank_pattern[layer] = _next_pow2(r)
    keep = sorted(finer.get(focus.id, set()))
    return Recommendation(
        setting=chosen.id if chosen else None,
        reason=reason,
        focus=focus.id,
        base_rank=base_rank,
        rank_pattern=rank_pattern,
        keep_finer=keep,
    )
