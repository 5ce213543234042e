"""What human formats share, read from the JSON document (schema.py): layers ranked
by their worst finding, findings grouped, numbers formatted once.

Every formatter renders the document, never the in-memory result, so a saved
report re-renders (`hallway-audit render`) exactly as it printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..rules import SEVERITIES

Doc = Mapping[str, Any]

SEVERITY_ORDER = SEVERITIES  # most severe first
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}
_RANK = {s: i for i, s in enumerate((*SEVERITY_ORDER, "ok"))}


def severity_rank(severity: str) -> int:
    """0 for error, 1 warning, 2 info, 3 ok: lower is more severe."""
    return _RANK[severity]


def worse(current: str, severity: str) -> str:
    """The more severe of a running verdict ('ok' or a severity) and a finding's severity."""
    return severity if severity_rank(severity) < severity_rank(current) else current


def rule_phases(doc: Doc) -> dict[str, str]:
    """rule id -> 'static' | 'dynamic', from the rule summary."""
    return {r["id"]: r["phase"] for r in doc["rules"]["summary"]}


@dataclass
class LayerRow:
    index: int  # position in the checkpoint, the tie-break
    layer: Mapping[str, Any]  # static.layers[i] of the document
    worst: str = "ok"
    verdicts: list[str] = field(default_factory=list)


def ranked_layers(doc: Doc) -> list[LayerRow]:
    rows = {layer["name"]: LayerRow(i, layer) for i, layer in enumerate(doc["static"]["layers"])}
    phases = rule_phases(doc)
    for f in doc["findings"]:
        row = rows.get(f["layer"] or "")
        if row is None or phases.get(f["rule"]) != "static":
            continue
        row.worst = worse(row.worst, f["severity"])
        if f["verdict"] not in row.verdicts:
            row.verdicts.append(f["verdict"])
    return sorted(rows.values(), key=lambda r: (severity_rank(r.worst), r.index))


@dataclass
class FindingGroup:
    """Findings of one rule in one setting: shown as one line with the layers it names."""

    first: Mapping[str, Any]  # the first finding, whose message is shown
    phase: str
    count: int = 0
    layers: list[str] = field(default_factory=list)


def grouped_findings(doc: Doc) -> list[FindingGroup]:
    groups: dict[tuple, FindingGroup] = {}
    phases = rule_phases(doc)
    for f in doc["findings"]:
        key = (f["rule"], f["setting"], f["scope"])
        group = groups.setdefault(key, FindingGroup(f, phases.get(f["rule"], "static")))
        group.count += 1
        if f["layer"]:
            group.layers.append(f["layer"])
    return list(groups.values())


def plan_line(st: Mapping[str, Any]) -> str:
    """The static plan as the header states it: the formats, the lr, and how weights are
    updated (master weights, rounding), which decides whether "cannot move" applies.
    A report of schema < 1.7 has no updates and shows formats and lr only."""
    text = f"formats {', '.join(st['formats'])}; lr {st['lr']:g}"
    updates = st.get("updates")
    if updates:
        text += f"; master weights {', '.join(updates['master_weights'])}; rounding {', '.join(updates['rounding'])}"
    return text


def verdict_label(verdict: str) -> str:
    """needs_finer_precision -> 'finer precision': short enough for a table cell."""
    return verdict.removeprefix("needs_").replace("_", " ")


def rule_file_label(path: str) -> str:
    """Bundled files by name, as the user asked for them; other files by path."""
    from pathlib import PurePath

    from ..rules import bundled_rule_files

    p = PurePath(path)
    if p.name in bundled_rule_files() and p.parent.name in ("rules", "bundled_rules", "<bundled>"):
        return f"{p.name} (bundled)"
    return path


def severity_counts(doc: Doc) -> dict[str, int]:
    counts = dict.fromkeys(SEVERITY_ORDER, 0)
    for f in doc["findings"]:
        counts[f["severity"]] += 1
    return counts


def skipped_rules(doc: Doc) -> dict[str, str]:
    """Rules that were skipped on every subject they had: id -> reason."""
    return {
        r["id"]: r["skip_reason"] or ""
        for r in doc["rules"]["summary"]
        if r["skipped"] and not r["fired"] and not r["passed"]
    }


def setting_severity(doc: Doc) -> dict[str, str]:
    """Worst fired severity per probed setting id ('ok' when nothing fired)."""
    worst = {s["id"]: "ok" for s in doc["settings"]}
    for f in doc["findings"]:
        sid = f["setting"]
        if sid in worst:
            worst[sid] = worse(worst[sid], f["severity"])
    return worst


def layer_verdicts(doc: Doc, setting: str) -> dict[str, tuple[str, list[str]]]:
    """layer -> (worst severity, verdicts) for one probed setting."""
    out: dict[str, tuple[str, list[str]]] = {}
    for f in doc["findings"]:
        if f["setting"] != setting or f["layer"] is None:
            continue
        sev, verdicts = out.get(f["layer"], ("ok", []))
        sev = worse(sev, f["severity"])
        if f["verdict"] not in verdicts:
            verdicts = [*verdicts, f["verdict"]]
        out[f["layer"]] = (sev, verdicts)
    return out


def gates(doc: Doc, outcome: Mapping[str, Any], severity: str) -> bool:
    """Does this outcome fail the gate? The same answer as audit.Gate.gates: a failed
    gate waives nothing, and when the gate passed no outcome gates."""
    gate = doc["gate"]
    return (
        not gate["passed"]
        and outcome["status"] == "fired"
        and gate["fail_on"] in SEVERITY_ORDER
        and severity_rank(severity) <= severity_rank(gate["fail_on"])
    )


def focus_setting(doc: Doc) -> Mapping[str, Any] | None:
    """The setting whose layers the report details: the recommendation's focus, else the first."""
    settings = doc["settings"]
    if not settings:
        return None
    rec = doc.get("recommendation")
    focus = rec.get("focus") if rec else None
    return next((s for s in settings if s["id"] == focus), settings[0])


def ordered_hist(hist: Mapping[str, float | None] | None) -> list[float | None]:
    """ulp_hist fractions in bin order (JSON keys are sorted alphabetically)."""
    if not hist:
        return []
    from ..probe.crossing import HIST_LABELS

    known = [hist[label] for label in HIST_LABELS if label in hist]
    return known + [v for k, v in hist.items() if k not in HIST_LABELS]


def format_bits(name: str) -> str:
    from ..lattice import get_format

    try:
        return str(get_format(name).bits)
    except Exception:  # a format this version does not know (a report from another version)
        return "?"


def pct(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if 0 < x < 10 ** (-digits - 2):
        return f"<{10 ** (-digits):.{digits}f}%"
    return f"{100 * x:.{digits}f}%"


def num(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    return format(x, spec)


def sqnr(summary: Mapping[str, Any]) -> str:
    """SQNR in dB; JSON holds null for an exact format (rel_error 0), shown as 'exact'."""
    if summary.get("sqnr_db") is None:
        return "exact" if summary.get("rel_error") == 0 else "-"
    return format(summary["sqnr_db"], ".1f")


def signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3g}"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


_SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(fractions: list[float | None]) -> str:
    """A histogram in one line of block characters (scaled to its largest bin)."""
    vals = [f or 0.0 for f in fractions]
    top = max(vals, default=0.0)
    if top <= 0:
        return ""
    return "".join(_SPARK[max(1, min(8, round(8 * v / top)))] if v > 0 else "·" for v in vals)


def interval(p: float | None, lo: float | None, hi: float | None) -> str:
    if p is None:
        return "-"
    if lo is None or hi is None:
        return f"{p:.2f}"
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}]"


def drop_interval(p: float | None, lo: float | None, hi: float | None) -> str:
    """A relative loss drop with its 95% interval, in percent."""
    if p is None:
        return "-"
    if lo is None or hi is None:
        return f"{p:.2%}"
    return f"{p:.2%} [{lo:.2%}, {hi:.2%}]"


def peft_snippet(rec: Mapping[str, Any], quote: Callable[[str], str] = json.dumps) -> str | None:
    """The recommended setting as a complete PEFT LoraConfig to paste.

    Strings are written as JSON strings, which are Python string literals too, so a
    module name holding quotes or control characters still pastes as the same string."""
    cfg = rec.get("lora_config")
    if not cfg:
        return None
    # every key of the JSON config, so the pasted line is the config (fan_in_fan_out included)
    first = [k for k in ("r", "lora_alpha", "target_modules", "use_rslora") if k in cfg]
    keys = first + sorted(k for k in cfg if k not in first)
    return "LoraConfig(" + ", ".join(f"{k}={_py(cfg[k], quote)}" for k in keys) + ")"


def _py(value: Any, quote: Callable[[str], str]) -> str:
    """A JSON value as the Python literal that evaluates to it."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}" if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_py(v, quote) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{quote(str(k))}: {_py(v, quote)}" for k, v in value.items()) + "}"
    if isinstance(value, int):
        return str(value)
    return quote(str(value))
