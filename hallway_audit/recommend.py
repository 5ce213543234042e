"""The practitioner rule as a choice: the cheapest setting that trains about as well as the best.

Among the probed settings with no fired error rule, the recommendation is the
cheapest (lowest rank, full fine-tuning last; then fewest bits; between equally cheap
ones the higher score) whose ranking score is within `REGRET` of the best passing score: the validation suite
(validation/README.md) measures the regret this rule leaves. A PEFT LoraConfig for
the recommended setting is complete (r, lora_alpha, target_modules, use_rslora, and
fan_in_fan_out for GPT-2's Conv1D layers) so it can be pasted as is. A per-layer
rank_pattern is reported as advice, not put in the config: on the suite, patterns
built from r_star did not beat the uniform rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .probe import DynamicResult, SettingResult
from .rules import Outcome

REGRET = 0.10  # accept a cheaper setting whose score is at least 90% of the best passing score


@dataclass(frozen=True)
class Recommendation:
    setting: str | None  # id of the recommended setting; None when none passes
    reason: str
    focus: str | None  # the setting whose layers the report details (recommended, or the closest to passing)
    base_rank: int | None = None  # the recommended setting's uniform LoRA rank
    rank_pattern: dict[str, int] = field(default_factory=dict)  # advice: layers whose gradient escapes base_rank
    keep_finer: list[str] = field(default_factory=list)
    lora_config: dict[str, object] | None = None  # PEFT LoraConfig keyword arguments for the recommended setting


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _cost(result: SettingResult) -> tuple:
    s = result.setting
    rank = s.subspace.rank if s.subspace.kind == "lora" else math.inf
    return (rank, s.bits, -s.subspace.sparsity)


def _score(result: SettingResult) -> float:
    value = result.model_metrics().get("score")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def target_modules(result: SettingResult) -> list[str]:
    """PEFT target_modules naming exactly the adapted layers that receive a gradient (an
    unused pooler is left out): their last name parts when those match no other linear
    layer, else the full module names."""
    adapted = sorted(name for name, d in result.layers.items() if d.planned_rank is not None and not d.no_grad)
    linear = [name for name, d in result.layers.items() if d.matrix_rank is not None]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    matched = [name for name in linear if name.rsplit(".", 1)[-1] in suffixes]
    return suffixes if sorted(matched) == adapted else adapted


def lora_config(result: SettingResult) -> dict[str, object] | None:
    sub = result.setting.subspace
    if sub.kind != "lora":
        return None
    config: dict[str, object] = {
        "r": sub.rank,
        "lora_alpha": sub.alpha if sub.alpha is not None else sub.rank,
        "target_modules": target_modules(result),
        "use_rslora": sub.rslora,
    }
    if any(d.fan_in_fan_out for d in result.layers.values() if d.planned_rank is not None):
        config["fan_in_fan_out"] = True  # GPT-2's Conv1D: PEFT would otherwise warn and flip it
    return config


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
        best = max(_score(r) for r in passing)
        floor = best - REGRET * abs(best) if math.isfinite(best) else -math.inf  # a best score may be negative
        near = [r for r in passing if _score(r) >= floor]
        # among equally cheap settings the better score: not the sweep's order (fp8 with and
        # without master weights cost the same rank and bits)
        chosen = min(near, key=lambda r: (_cost(r), -_score(r)))
        reason = (f"the cheapest setting (lowest rank, then fewest bits; the higher score between equals) whose "
                  f"score is within {REGRET:.0%} of the best among the settings that pass every error rule")
        focus = chosen
    else:
        chosen = None
        reason = "no probed setting passes every error rule" + (" (the checkpoint itself has errors)" if global_errors else "")
        focus = min(dynamic.settings, key=lambda r: (errors[r.id], -_score(r), _cost(r)))
    escaping: set[str] = set()
    finer: set[str] = set()
    for o in outcomes:
        if o.status != "fired" or o.subject.layer is None or o.subject.setting != focus.id:
            continue
        if o.rule.verdict == "needs_higher_rank":
            escaping.add(o.subject.layer)
        if o.rule.verdict in ("needs_finer_precision", "keep_finer", "stochastic_rounding", "raise_lr",
                              "fp32_master_weights"):
            finer.add(o.subject.layer)
    rank_pattern: dict[str, int] = {}
    base_rank = focus.setting.subspace.rank if focus.setting.subspace.kind == "lora" else None
    for layer in sorted(escaping):
        d = results[focus.id].layers[layer]
        if d.r_star is not None and d.r_star > (d.planned_rank or 0):
            rank_pattern[layer] = _next_pow2(d.r_star)
    return Recommendation(
        setting=chosen.id if chosen else None,
        reason=reason,
        focus=focus.id,
        base_rank=base_rank,
        rank_pattern=rank_pattern,
        keep_finer=sorted(finer),
        lora_config=lora_config(chosen) if chosen is not None else None,
    )
