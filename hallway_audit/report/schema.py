"""The versioned JSON document: every number the table shows, keys sorted.

Bump SCHEMA_VERSION's minor part when adding keys and its major part when
changing or removing one; README "JSON reference" documents each key.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..gc_pause import gc_paused
from ..probe.horizon import Schedule

if TYPE_CHECKING:
    from ..audit import AuditResult

SCHEMA_VERSION = "1.7"


def clean(value: Any) -> Any:
    """JSON has no inf/nan: they become null (sqnr_db is null when rel_error is 0)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def _key(key: Any) -> str:
    """A mapping key as json.dumps writes it (str, int, float, bool or None)."""
    if isinstance(key, str):
        return str.__str__(key)
    if isinstance(key, float):
        return json.dumps(key, allow_nan=False)
    if key is True or key is False or key is None:
        return json.dumps(key)
    if isinstance(key, int):
        return int.__repr__(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def plain(value: Any) -> Any:
    """`value` exactly as a saved report reads it back, in one pass and without the text:
    what json.loads(json.dumps(clean(value), sort_keys=True)) gives -- fresh dicts with
    keys sorted and written as JSON writes them, tuples as lists, inf/nan as None, str,
    int and float subclasses as the plain type -- and json.dumps's TypeError for a
    value JSON cannot hold."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if value - value == 0.0 else None  # inf - inf and nan - nan are nan
    if kind is dict:
        return {_key(k): plain(v) for k, v in sorted(value.items())}
    if kind is list or kind is tuple:
        return [plain(v) for v in value]
    # subclasses, in the order json's encoder tests them
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return plain(float.__float__(value))
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {_key(k): plain(v) for k, v in sorted(value.items())}
    raise TypeError(f"Object of type {kind.__name__} is not JSON serializable")


def _text(value: Any) -> Any:
    return value if value is None or type(value) is str else plain(value)


def _format_block(tally_formats: dict, names: list[str]) -> dict[str, dict]:
    return {name: tally_formats[name].summary() for name in names}


def _layer(layer, formats: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": layer.name,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in layer.tensors],
        **layer.basics(),
        "formats": _format_block(layer.tally.formats, formats),
    }
    return out


# Findings and outcomes are most of a large checkpoint's document (11 outcomes a
# layer with the default rules): built here with their keys in sorted order and
# plain values, so that the document needs no second pass (see `plain`).


def finding_dict(outcome) -> dict[str, Any]:
    rule, subject = outcome.rule, outcome.subject
    return {
        "layer": _text(subject.layer),
        "message": _text(outcome.message),
        "rule": _text(rule.id),
        "scope": _text(subject.scope),
        "setting": _text(subject.setting),
        "severity": _text(rule.severity),
        "verdict": _text(rule.verdict),
    }


def outcome_dict(outcome) -> dict[str, Any]:
    subject = outcome.subject
    return {
        "layer": _text(subject.layer),
        "message": _text(outcome.message),
        "rule": _text(outcome.rule.id),
        "scope": _text(subject.scope),
        "setting": _text(subject.setting),
        "status": _text(outcome.status),
    }


def rule_summary(result: AuditResult) -> list[dict[str, Any]]:
    counts: dict[str, Counter] = {r.id: Counter() for r in result.ruleset.rules}
    reasons: dict[str, str] = {}
    for o in result.outcomes:
        counts[o.rule.id][o.status] += 1
        if o.status == "skipped":
            reasons.setdefault(o.rule.id, o.message)
    return [
        {
            "id": r.id,
            "severity": r.severity,
            "verdict": r.verdict,
            "scope": r.scope,
            "phase": r.phase,
            "source": r.source,
            "fired": counts[r.id]["fired"],
            "passed": counts[r.id]["passed"],
            "skipped": counts[r.id]["skipped"],
            "skip_reason": reasons.get(r.id),
        }
        for r in result.ruleset.rules
    ]


def _setting_dict(r) -> dict[str, Any]:
    s = r.setting
    p, sub, o = s.precision, s.subspace, s.optimizer
    layers = r.layer_metrics()
    return {
        "id": r.id,
        "precision": {"weights": p.weights, "activations": p.activations, "rounding": p.rounding,
                      "master_weights": p.master_weights, "bits": s.bits},
        "subspace": {"kind": sub.kind, "rank": sub.rank if sub.kind == "lora" else None, "targets": sub.targets,
                     "alpha": sub.alpha, "rslora": sub.rslora, "rank_pattern": dict(sub.rank_pattern),
                     "sparsity": sub.sparsity, "mask": sub.mask if sub.kind == "sparse" else None},
        "optimizer": {"kind": o.kind, "lr": o.lr, "weight_decay": o.weight_decay, "betas": list(o.betas), "eps": o.eps},
        "model": {**r.model_metrics(), "initial_loss": r.initial_loss, "initial_val_loss": r.initial_val_loss},
        "layers": [
            {"name": name, "trainable": r.layers[name].trainable, "matrix_rank": r.layers[name].matrix_rank,
             "planned_rank": r.layers[name].planned_rank, **metrics}
            for name, metrics in layers.items()
        ],
        "steps": [vars(step) for step in r.steps],
        "p_t_states": [_pt_state(state) for state in r.pt],
        "cost": {"forwards": r.forwards, "backwards": r.backwards},
    }


def _rate(prefix: str, rate) -> dict[str, Any]:
    if rate is None:
        return {prefix: None}
    lo, hi = rate.interval
    return {prefix: rate.p, f"{prefix}_lo": lo, f"{prefix}_hi": hi, f"{prefix}_samples": rate.n}


def _pt_state(state) -> dict[str, Any]:
    return {
        "step": state.step,
        "radius": state.radius,
        **_rate("p_t", state.optimizer),
        "blocked": state.blocked / state.optimizer.n if state.optimizer.n else None,
        **_rate("p_t_uniform", state.uniform),
        "blocked_uniform": state.blocked_uniform / state.uniform.n if state.uniform.n else None,
        **_rate("p_t_val", state.val),
        "psi_val": state.psi_val,
        "g_b": state.g_b,
        "g_b_reason": state.g_b_reason,
    }


def _dynamic_dict(d) -> dict[str, Any]:
    o = d.options
    return {
        "model": d.model_source,
        "loss": d.loss_name,
        "calib": d.calib,
        "val": d.val,
        "train_examples": d.train_examples,
        "val_examples": d.val_examples,
        "tokens": d.tokens,
        "device": d.device,
        "steps": o.steps,
        "samples": o.samples,
        "sigma": o.sigma,
        "seed": o.seed,
        "micro_batch": o.micro_batch,
        "eval_batch": o.eval_batch,
        "p_every": o.p_every,
        "psi_target": o.psi_target,
        "per_layer_p": o.per_layer_p,
        "early_stop": o.early_stop,
        "schedule": vars(o.schedule or Schedule()),
        "train_steps": (o.schedule or Schedule()).steps,
        "beta_floor": o.beta_floor,
        # what each device holds for the largest setting, estimated before any burst (hallway_audit.memory)
        "memory": d.estimate.memory.to_dict() if d.estimate is not None and d.estimate.memory is not None else None,
        "placement": d.placement,  # --device-map: module -> device, the --max-memory budget, weight bytes per place
    }


def _updates(result: AuditResult) -> dict[str, Any] | None:
    """What decides whether the static "cannot move" rules apply (subjects.FormatUpdates)."""
    u = result.updates
    if u is None:
        return None
    return {"master_weights": list(u.master_weights), "rounding": list(u.rounding),
            "rounds_stored": dict(u.rounds_stored), "probed": dict(u.probed)}


def result_to_dict(result: AuditResult) -> dict[str, Any]:
    """The document exactly as `--format json` writes it and json.load reads it back
    (keys sorted, inf/nan as null, plain JSON values; see `plain`)."""
    with gc_paused():  # 10^6 entries on a checkpoint of 10^5 layers, none in a cycle
        return _result_to_dict(result)


def _result_to_dict(result: AuditResult) -> dict[str, Any]:
    st = result.static
    ck = result.checkpoint
    doc = plain({
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "hallway-audit", "version": __version__},
        "checkpoint": {"path": ck.path, "format": ck.kind, "tensors": ck.tensors, "params": ck.params, "bytes": ck.bytes},
        "static": {
            "formats": list(st.formats),
            "lr": st.lr,
            "spectral": st.spectral,
            "updates": _updates(result),
            "model": {**st.model.basics(), "formats": _format_block(st.model.formats, st.formats)},
            "layers": [],  # the long lists are filled in below, keeping the keys' order
            "skipped_tensors": [{"name": n, "reason": why} for n, why in st.skipped],
        },
        "rules": {"files": list(result.ruleset.files), "vars": dict(result.ruleset.vars), "summary": rule_summary(result)},
        "findings": [],
        "outcomes": [],
        "dynamic": _dynamic_dict(result.dynamic) if result.dynamic is not None else None,
        "settings": [_setting_dict(r) for r in result.dynamic.settings] if result.dynamic is not None else [],
        "recommendation": vars(result.recommendation) if result.recommendation is not None else None,
        "notes": list(result.notes),
        "gate": {"passed": result.gate.passed, "fail_on": result.gate.fail_on, "exit_code": result.gate.exit_code,
                 "reason": result.gate.reason},
    })
    doc["static"]["layers"] = [plain(_layer(layer, st.formats)) for layer in st.layers]
    doc["findings"] = [finding_dict(o) for o in result.findings]
    doc["outcomes"] = [outcome_dict(o) for o in result.outcomes]
    return doc
