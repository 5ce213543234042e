"""What human formats share: layers ranked by their worst finding, numbers formatted once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..rules import SEVERITIES, severity_rank

if TYPE_CHECKING:
    from ..audit import AuditResult

SEVERITY_ORDER = SEVERITIES  # most severe first
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


def worse(current: str, severity: str) -> str:
    """The more severe of a running verdict ('ok' or a severity) and a finding's severity."""
    if current == "ok" or severity_rank(severity) < severity_rank(current):
        return severity
    return current


@dataclass
class LayerRow:
    index: int  # position in the checkpoint, the tie-break
    layer: object  # static LayerResult
    worst: str = "ok"
    verdicts: list[str] = field(default_factory=list)


def ranked_layers(result: AuditResult) -> list[LayerRow]:
    rows = {layer.name: LayerRow(i, layer) for i, layer in enumerate(result.static.layers)}
    for o in result.findings:
        row = rows.get(o.subject.layer or "")
        if row is None or o.rule.phase != "static":
            continue
        row.worst = worse(row.worst, o.rule.severity)
        if o.rule.verdict not in row.verdicts:
            row.verdicts.append(o.rule.verdict)
    rank = {s: i for i, s in enumerate((*SEVERITY_ORDER, "ok"))}
    return sorted(rows.values(), key=lambda r: (rank[r.worst], r.index))


@dataclass
class FindingGroup:
    """Findings of one rule in one setting: shown as one line with the layers it names."""

    first: object  # the first Outcome, whose message is shown
    layers: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return max(1, len(self.layers))


def grouped_findings(result: AuditResult) -> list[FindingGroup]:
    groups: dict[tuple, FindingGroup] = {}
    for o in result.findings:
        key = (o.rule.id, o.subject.setting, o.subject.scope)
        group = groups.setdefault(key, FindingGroup(o))
        if o.subject.layer:
            group.layers.append(o.subject.layer)
    return list(groups.values())


def verdict_label(verdict: str) -> str:
    """needs_finer_precision -> 'finer precision': short enough for a table cell."""
    return verdict.removeprefix("needs_").replace("_", " ")


def rule_file_label(path: str) -> str:
    """Bundled files by name, as the user asked for them; other files by path."""
    from pathlib import Path

    from ..rules import bundled_rule_files

    p = Path(path)
    if p.name in bundled_rule_files() and p.parent.name in ("rules", "bundled_rules"):
        return f"{p.name} (bundled)"
    return path


def severity_counts(result: AuditResult) -> dict[str, int]:
    counts = dict.fromkeys(SEVERITY_ORDER, 0)
    for o in result.findings:
        counts[o.rule.severity] += 1
    return counts


def skipped_rules(result: AuditResult) -> dict[str, str]:
    """Rules that were skipped on every subject they had: id -> reason."""
    status: dict[str, set[str]] = {}
    reason: dict[str, str] = {}
    for o in result.outcomes:
        status.setdefault(o.rule.id, set()).add(o.status)
        if o.status == "skipped":
            reason.setdefault(o.rule.id, o.message)
    return {rid: reason[rid] for rid, st in status.items() if st == {"skipped"}}


def pct(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if 0 < x < 10 ** (-digits - 2):
        return f"<{10 ** (-digits):.{digits}f}%"
    return f"{100 * x:.{digits}f}%"


def num(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "exact" if x > 0 else "-inf"
    return format(x, spec)


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
    return "".join(_SPARK[max(1, min(8, int(round(8 * v / top))))] if v > 0 else "·" for v in vals)


def interval(p: float | None, lo: float | None, hi: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}]"


def setting_severity(result: AuditResult) -> dict[str, str]:
    """Worst fired severity per dynamic setting id ('ok' when nothing fired)."""
    worst: dict[str, str] = {}
    if result.dynamic is None:
        return worst
    for r in result.dynamic.settings:
        worst[r.id] = "ok"
    for o in result.findings:
        sid = o.subject.setting
        if sid in worst:
            worst[sid] = worse(worst[sid], o.rule.severity)
    return worst


def layer_verdicts(result: AuditResult, setting: str) -> dict[str, tuple[str, list[str]]]:
    """layer -> (worst severity, verdicts) for one dynamic setting."""
    out: dict[str, tuple[str, list[str]]] = {}
    for o in result.findings:
        if o.subject.setting != setting or o.subject.layer is None:
            continue
        sev, verdicts = out.get(o.subject.layer, ("ok", []))
        sev = worse(sev, o.rule.severity)
        if o.rule.verdict not in verdicts:
            verdicts = [*verdicts, o.rule.verdict]
        out[o.subject.layer] = (sev, verdicts)
    return out


def peft_snippet(rec) -> str | None:
    """The rank recommendation as a line to paste into a PEFT LoraConfig."""
    if not rec.rank_pattern:
        return None
    pattern = ", ".join(f'"{k}": {v}' for k, v in rec.rank_pattern.items())
    return f"LoraConfig(r={rec.base_rank}, rank_pattern={{{pattern}}})"
