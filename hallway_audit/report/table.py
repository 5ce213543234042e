"""The console report for people: summary panel, model table, ranked layers, findings."""

from __future__ import annotations

import io

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .base import Formatter, RenderOptions, register_formatter
from .rows import (
    SEVERITY_STYLE,
    grouped_findings,
    human_bytes,
    human_count,
    interval,
    layer_verdicts,
    num,
    pct,
    peft_snippet,
    ranked_layers,
    rule_file_label,
    setting_severity,
    severity_counts,
    skipped_rules,
    sparkline,
    verdict_label,
)


def _summary(result) -> Panel:
    ck, st = result.checkpoint, result.static
    counts = severity_counts(result)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("checkpoint", f"{ck.path} ({ck.kind})")
    speed = f", read in {st.seconds:.2g} s" if st.seconds > 0 else ""
    grid.add_row("size", f"{human_count(ck.params)} params in {ck.tensors} tensors, {human_bytes(ck.bytes)}{speed}")
    grid.add_row("plan", f"formats {', '.join(st.formats)}; lr {st.lr:g}")
    if result.dynamic is not None:
        d = result.dynamic
        grid.add_row("model", f"{d.model_source}; loss {d.loss_name}; device {d.device}")
        grid.add_row("data", f"{d.calib}: {d.train_examples} train / {d.val_examples} held-out examples, {d.tokens} tokens")
        grid.add_row("sweep", f"{len(d.settings)} settings x {d.options.steps} steps, seed {d.options.seed}, {d.seconds:.1f} s")
    grid.add_row("rules", ", ".join(rule_file_label(f) for f in result.ruleset.files) or "none")
    found = Text()
    for sev in ("error", "warning", "info"):
        if found:
            found.append(", ")
        found.append(f"{counts[sev]} {sev}{'s' if counts[sev] != 1 else ''}", style=SEVERITY_STYLE[sev] if counts[sev] else "")
    grid.add_row("findings", found)
    gate = result.gate
    verdict = Text("PASSED", style="bold green") if gate.passed else Text("FAILED", style="bold red")
    verdict.append(f"  {gate.reason}; fail-on {gate.fail_on}, exit {gate.exit_code}", style="dim")
    grid.add_row("gate", verdict)
    return Panel(grid, title="hallway-audit", title_align="left", box=box.ROUNDED)


def _model_table(result) -> Table:
    st = result.static
    from ..lattice import get_format

    t = Table(title="Whole model, per format", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("format", "bits", "rel err", "SQNR dB", "saturated", "flushed", "beta_pred", "med ulp/|w|"):
        t.add_column(col, justify="left" if col == "format" else "right")
    for fmt in st.formats:
        s = st.model.formats[fmt].summary()
        t.add_row(
            fmt,
            str(get_format(fmt).bits),
            num(s["rel_error"]),
            num(s["sqnr_db"], ".1f"),
            pct(s["saturated"], 3),
            pct(s["flushed"], 3),
            pct(s["beta_pred"]),
            num(s["ulp_rel_median"]),
        )
    return t


def _layer_table(result, max_rows: int) -> tuple[Table, int]:
    st = result.static
    rows = ranked_layers(result)
    t = Table(
        title=f"Layers, most severe first (beta_pred at lr {st.lr:g})",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    width = min(32, max((len(r.layer.name) for r in rows), default=5))
    t.add_column("layer", overflow="fold", min_width=width)
    t.add_column("params", justify="right")
    for fmt in st.formats:
        t.add_column(f"{fmt}\nbeta_pred", justify="right")
        t.add_column(f"{fmt}\nSQNR dB", justify="right")
    t.add_column("verdict", min_width=16)
    shown = rows if max_rows <= 0 else rows[:max_rows]
    for row in shown:
        layer = row.layer
        cells = [layer.name, human_count(layer.tally.params)]
        for fmt in st.formats:
            s = layer.format_metrics(fmt)
            cells += [pct(s["beta_pred"]), num(s["sqnr_db"], ".1f")]
        label = ", ".join(verdict_label(v) for v in row.verdicts) if row.verdicts else "ok"
        if layer.tally.nonfinite:
            cells[0] = f"{layer.name} ({layer.tally.nonfinite} non-finite)"
        t.add_row(*cells, Text(label, style=SEVERITY_STYLE[row.worst]))
    return t, len(rows) - len(shown)


def _findings(result, max_rows: int) -> Table | None:
    groups = grouped_findings(result)
    if not groups:
        return None
    t = Table(title="Findings (one line per rule and setting)", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("severity")
    t.add_column("rule")
    dynamic = any(g.first.rule.phase == "dynamic" for g in groups)
    if dynamic:
        t.add_column("setting", no_wrap=True)
    t.add_column("message", overflow="fold")
    shown = groups if max_rows <= 0 else groups[:max_rows]
    for g in shown:
        o = g.first
        message = o.message
        if len(g.layers) > 1:
            others = g.layers[1:]
            listed = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
            message += f" [also {listed}]"
        cells = [Text(o.rule.severity, style=SEVERITY_STYLE[o.rule.severity]), o.rule.id]
        if dynamic:
            cells.append(o.subject.setting if o.rule.phase == "dynamic" and o.subject.setting else "")
        t.add_row(*cells, message)
    if len(shown) < len(groups):
        t.caption = f"{len(groups) - len(shown)} more rule groups: --max-rows 0 shows all, --format json lists every finding"
    return t


def _settings_table(result) -> Table:
    dyn = result.dynamic
    severity = setting_severity(result)
    rec = result.recommendation
    t = Table(
        title=f"Probe bursts: {dyn.options.steps} steps each, p_t from up to {dyn.options.samples} moves per state (95% Wilson)",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        padding=(0, 1),
    )
    t.add_column("setting", overflow="fold")
    for col in ("psi", "psi_rank", "p_t [95% CI]", "unif", "blocked", "beta", "beta_eff", "dloss", "verdict"):
        t.add_column(col, justify="left" if col in ("verdict", "p_t [95% CI]") else "right", no_wrap=True)
    for r in dyn.settings:
        m = r.model_metrics()
        label = Text(r.id, style="bold green" if rec is not None and rec.setting == r.id else "")
        sev = severity.get(r.id, "ok")
        t.add_row(
            label,
            num(m["psi"], ".2f"),
            num(m["psi_rank"], ".2f"),
            interval(m["p_t"], m["p_t_lo"], m["p_t_hi"]),
            num(m["p_t_uniform"], ".2f"),
            pct(m["blocked"], 0),
            pct(m["beta"]),
            pct(m["beta_eff"], 0),
            f"{m['loss_delta']:+.3g}",
            Text(sev, style=SEVERITY_STYLE[sev]),
        )
    if rec is not None:
        t.caption = f"recommended: {rec.setting}" if rec.setting else "no probed setting passes every error rule"
    return t


def _dynamic_layer_table(result, setting_id: str, max_rows: int) -> tuple[Table, int]:
    r = next(s for s in result.dynamic.settings if s.id == setting_id)
    metrics = r.layer_metrics()
    verdicts = layer_verdicts(result, setting_id)
    rank = {"error": 0, "warning": 1, "info": 2, "ok": 3}
    order = list(metrics)
    names = [n for n in order if r.layers[n].trainable]
    frozen = len(order) - len(names)
    names.sort(key=lambda n: (rank[verdicts.get(n, ("ok", []))[0]], order.index(n)))
    t = Table(title=f"Layers of {setting_id}, most severe first", box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 1))
    t.add_column("layer", overflow="fold", min_width=min(34, max((len(n) for n in names), default=5)))
    for col in ("psi", "psi_rank", "r_star", "beta", "beta_eff", "p_t surr"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("|du|/ULP", no_wrap=True)
    t.add_column("verdict", min_width=10)
    shown = names if max_rows <= 0 else names[:max_rows]
    for name in shown:
        m = metrics[name]
        sev, vs = verdicts.get(name, ("ok", []))
        hist = m["ulp_hist"]
        t.add_row(
            name,
            num(m["psi"], ".2f"),
            num(m["psi_rank"], ".2f"),
            str(m["r_star"]) if m["r_star"] is not None else "-",
            pct(m["beta"]),
            pct(m["beta_eff_elem"], 0),
            num(m["p_t_surrogate"], ".2f"),
            sparkline(list(hist.values())) if hist else "",
            Text(", ".join(verdict_label(v) for v in vs) if vs else "ok", style=SEVERITY_STYLE[sev]),
        )
    t.caption = "beta_eff: activation cells changed; |du|/ULP: proposed steps, bins 1/64..64"
    if frozen:
        t.caption += f"; {frozen} untrained layers not shown"
    return t, len(names) - len(shown)


def _recommendation(result) -> Panel:
    rec = result.recommendation
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    if rec.setting:
        grid.add_row("setting", Text(rec.setting, style="bold green"))
    else:
        grid.add_row("setting", Text("none of the probed settings passes", style="bold red"))
    grid.add_row("why", rec.reason)
    snippet = peft_snippet(rec)
    if snippet:
        label = "or, cheaper" if rec.setting and rec.base_rank is not None else "rank_pattern"
        grid.add_row(label, snippet)
    if rec.keep_finer:
        grid.add_row("keep finer", ", ".join(rec.keep_finer))
    return Panel(grid, title="Recommendation", title_align="left", box=box.ROUNDED)


def build_report(result, options: RenderOptions) -> Group:
    parts: list = [_summary(result), _model_table(result)]
    layers, hidden = _layer_table(result, options.max_rows)
    if hidden:
        layers.caption = f"{hidden} more layers (--max-rows 0 shows all)"
    parts.append(layers)
    if result.dynamic is not None and result.dynamic.settings:
        parts.append(_settings_table(result))
        focus = result.recommendation.focus if result.recommendation else result.dynamic.settings[0].id
        table, hidden_dyn = _dynamic_layer_table(result, focus, options.max_rows)
        if hidden_dyn:
            table.caption = (table.caption + "; " if table.caption else "") + f"{hidden_dyn} more layers (--max-rows 0 shows all)"
        parts.append(table)
        if result.recommendation is not None:
            parts.append(_recommendation(result))
    findings = _findings(result, options.max_rows)
    if findings is not None:
        parts.append(findings)
    skipped = skipped_rules(result)
    notes = list(result.notes)
    if skipped:
        notes.append(f"{len(skipped)} rules skipped, never evaluated: {', '.join(sorted(skipped))}")
    if result.static.skipped:
        notes.append(f"{len(result.static.skipped)} non-float tensors not audited")
    for note in notes:
        parts.append(Text(f"note: {note}", style="dim"))
    return Group(*parts)


@register_formatter
class TableFormatter(Formatter):
    name = "table"
    machine = False
    suffix = ".txt"

    def render(self, result, options: RenderOptions) -> str:
        buf = io.StringIO()
        console = Console(
            file=buf,
            force_terminal=options.color,
            no_color=not options.color,
            color_system="256" if options.color else None,
            width=options.width,
            highlight=False,
        )
        console.print(build_report(result, options))
        return buf.getvalue()
