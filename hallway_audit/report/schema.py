"""The versioned JSON document: every number the table shows, keys sorted.

Bump SCHEMA_VERSION's minor part when adding keys and its major part when
changing or removing one; README "JSON reference" documents each key.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from ..audit import AuditResult

SCHEMA_VERSION = "1.0"


def clean(value: Any) -> Any:
    """JSON has no inf/nan: they become null (sqnr_db is null when rel_error is 0)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


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


def finding_dict(outcome) -> dict[str, Any]:
    return {
        "rule": outcome.rule.id,
        "severity": outcome.rule.severity,
        "verdict": outcome.rule.verdict,
        "scope": outcome.subject.scope,
        "layer": outcome.subject.layer,
        "setting": outcome.subject.setting,
        "message": outcome.message,
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


def result_to_dict(result: AuditResult) -> dict[str, Any]:
    st = result.static
    ck = result.checkpoint
    doc = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "hallway-audit", "version": __version__},
        "checkpoint": {"path": ck.path, "format": ck.kind, "tensors": ck.tensors, "params": ck.params, "bytes": ck.bytes},
        "static": {
            "formats": list(st.formats),
            "lr": st.lr,
            "spectral": st.spectral,
            "model": {**st.model.basics(), "formats": _format_block(st.model.formats, st.formats)},
            "layers": [_layer(layer, st.formats) for layer in st.layers],
            "skipped_tensors": [{"name": n, "reason": why} for n, why in st.skipped],
        },
        "rules": {"files": list(result.ruleset.files), "vars": dict(result.ruleset.vars), "summary": rule_summary(result)},
        "findings": [finding_dict(o) for o in result.findings],
        "notes": list(result.notes),
        "gate": {"passed": result.gate.passed, "fail_on": result.gate.fail_on, "exit_code": result.gate.exit_code},
    }
    return clean(doc)
