"""The console report for people: summary panel, model table, ranked layers, findings.

Rendered from the JSON document. Every string that came from a checkpoint, plan or
rule file goes into a rich Text through `visible` (never parsed as markup, control
characters shown as escapes), and every table is laid out by layout.fitted_table.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .base import Formatter, RenderOptions, register_formatter
from .escape import visible
from .layout import Column, abbreviate, fitted_table
from .rows import (
    SEVERITY_STYLE,
    Doc,
    drop_interval,
    focus_setting,
    format_bits,
    grouped_findings,
    human_bytes,
    human_count,
    interval,
    layer_verdicts,
    num,
    ordered_hist,
    pct,
    peft_snippet,
    plan_line,
    ranked_layers,
    rule_file_label,
    setting_severity,
    severity_counts,
    skipped_rules,
    sparkline,
    sqnr,
    verdict_label,
)


def _t(value: object, style: str = "") -> Text:
    """Untrusted text as a rich Text: no markup, control characters visible."""
    return Text(visible(value), style=style)


def _summary(doc: Doc) -> Panel:
    ck, st, gate = doc["checkpoint"], doc["static"], doc["gate"]
    counts = severity_counts(doc)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("checkpoint", _t(f"{ck['path']} ({ck['format']})"))
    grid.add_row("size", f"{human_count(ck['params'])} params in {ck['tensors']} tensors, {human_bytes(ck['bytes'])}")
    grid.add_row("plan", _t(plan_line(st)))
    d = doc["dynamic"]
    if d is not None:
        grid.add_row("model", _t(f"{d['model']}; loss {d['loss']}; device {d['device']}"))
        grid.add_row("data", _t(f"{d['calib']}: {d['train_examples']} train / {d['val_examples']} held-out examples, {d['tokens']} tokens"))
        grid.add_row("sweep", f"{len(doc['settings'])} settings x {d['steps']} steps, seed {d['seed']}")
    grid.add_row("rules", _t(", ".join(rule_file_label(f) for f in doc["rules"]["files"]) or "none"))
    found = Text()
    for sev in ("error", "warning", "info"):
        if found:
            found.append(", ")
        found.append(f"{counts[sev]} {sev}{'s' if counts[sev] != 1 else ''}", style=SEVERITY_STYLE[sev] if counts[sev] else "")
    grid.add_row("findings", found)
    verdict = Text("PASSED", style="bold green") if gate["passed"] else Text("FAILED", style="bold red")
    verdict.append(visible(f"  {gate['reason']}; fail-on {gate['fail_on']}, exit {gate['exit_code']}"), style="dim")
    grid.add_row("gate", verdict)
    return Panel(grid, title="hallway-audit", title_align="left", box=box.ROUNDED)


def _model_table(doc: Doc, width: int) -> Table:
    st = doc["static"]
    cols = [
        Column("format", justify="left"),
        Column("bits", drop=1),
        Column("rel err"),
        Column("SQNR dB"),
        Column("saturated"),
        Column("flushed"),
        Column("beta_pred"),
        Column("med\nulp/|w|", drop=2, label="med ulp/|w|"),
    ]
    for fmt in st["formats"]:
        s = st["model"]["formats"][fmt]
        values = [visible(fmt), format_bits(fmt), num(s["rel_error"]), sqnr(s), pct(s["saturated"], 3),
                  pct(s["flushed"], 3), pct(s["beta_pred"]), num(s["ulp_rel_median"])]
        for col, value in zip(cols, values, strict=True):
            col.cells.append(Text(value))
    return fitted_table("Whole model, per format", cols, width)


def _layer_table(doc: Doc, options: RenderOptions) -> Table:
    st = doc["static"]
    rows = ranked_layers(doc)
    shown = rows if options.max_rows <= 0 else rows[: options.max_rows]
    formats = st["formats"]
    name = Column("layer", justify="left", kind="name")
    params = Column("params", drop=2 * len(formats) + 1)
    # Dropped first: SQNR columns (last format first), then params, then beta_pred of all but the first format.
    beta = [Column(f"{visible(f)}\nbeta_pred", drop=(2 * len(formats) + 1 + len(formats) - i) if i else 0,
                   label=f"{visible(f)} beta_pred") for i, f in enumerate(formats)]
    sq = [Column(f"{visible(f)}\nSQNR dB", drop=len(formats) - i, label=f"{visible(f)} SQNR") for i, f in enumerate(formats)]
    verdict = Column("verdict", justify="left", kind="wrap", floor=15)
    labels: list[str] = []
    for row in shown:
        layer = row.layer
        name.cells.append(_t(layer["name"]))
        params.cells.append(Text(human_count(layer["params"])))
        for i, fmt in enumerate(formats):
            s = layer["formats"][fmt]
            beta[i].cells.append(Text(pct(s["beta_pred"])))
            sq[i].cells.append(Text(sqnr(s)))
        items = [verdict_label(v) for v in row.verdicts] or ["ok"]
        if layer["nonfinite"]:
            items.append(f"{layer['nonfinite']} non-finite")
        labels += items
        verdict.cells.append(_t(", ".join(items), SEVERITY_STYLE[row.worst]))
    verdict.comfort = max((len(x) + 1 for x in labels), default=0)
    cols = [name, params]
    for b, s in zip(beta, sq, strict=True):
        cols += [b, s]
    cols.append(verdict)
    caption = [f"+{len(rows) - len(shown)} more layers (--max-rows 0 shows all)"] if len(shown) < len(rows) else []
    return fitted_table(f"Layers, most severe first (beta_pred at lr {st['lr']:g})", cols, options.width, caption)


def _findings(doc: Doc, options: RenderOptions) -> Table | None:
    groups = grouped_findings(doc)
    if not groups:
        return None
    shown = groups if options.max_rows <= 0 else groups[: options.max_rows]
    dynamic = any(g.phase == "dynamic" for g in groups)
    settings = [g.first["setting"] if g.phase == "dynamic" and g.first["setting"] else "" for g in shown]
    longest_rule = min(30, max(len(g.first["rule"]) for g in groups))
    longest_setting = max((len(x) for x in settings), default=0)
    # The setting gets its own column when the message keeps 40 columns, else it goes under the rule id.
    own_column = dynamic and options.width - (3 * 5 + 1 + 8 + 4 + longest_rule + longest_setting) >= 40
    severity = Column("severity", justify="left")
    count = Column("n", drop=1)
    rule = Column("rule" if own_column or not dynamic else "rule / setting", justify="left", kind="wrap", floor=12)
    setting = Column("setting", justify="left", kind="wrap")
    message = Column("message", justify="left", kind="wrap", floor=30)
    # Layer names listed after a message are abbreviated to the message column's likely width,
    # so none is broken across lines.
    room = max(16, options.width - (3 * 5 + 1 + 8 + 4 + max(longest_rule, longest_setting if not own_column else 0))
               - (longest_setting if own_column else 0) - 1)
    for g, sid in zip(shown, settings, strict=True):
        f = g.first
        text = f["message"]
        if len(g.layers) > 1:
            others = [abbreviate(visible(n), room) for n in g.layers[1:]]
            listed = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
            text += f" [also {listed}]"
        severity.cells.append(Text(f["severity"], style=SEVERITY_STYLE[f["severity"]]))
        count.cells.append(Text(str(g.count)))
        if own_column or not sid:
            rule.cells.append(_t(f["rule"]))
        else:
            rule.cells.append(Text.assemble(_t(f["rule"]), "\n", _t(sid, "dim")))
        setting.cells.append(_t(sid))
        message.cells.append(_t(text))
    cols = [severity, count, rule] + ([setting] if own_column else []) + [message]
    total = len(doc["findings"])
    caption = []
    cut = groups[len(shown):]
    if cut:  # rows left out by --max-rows, as rows and as the findings they stand for
        caption.append(f"+{len(cut)} more rows ({sum(g.count for g in cut)} findings; --max-rows 0 shows all)")
    if len(groups) < total:  # a row stands for several findings: say so, not "+N more" (nothing else is hidden)
        caption.append(f"{total} findings in {len(groups)} rows (n: findings a row stands for; --format json lists each)")
    return fitted_table(f"Findings: {total}, one line per rule and setting", cols, options.width, caption)


def _settings_table(doc: Doc, options: RenderOptions) -> Table:
    d = doc["dynamic"]
    severity = setting_severity(doc)
    rec = doc["recommendation"]
    chosen = rec["setting"] if rec is not None else None
    spec = [
        ("score", "score", 0), ("progress [95% CI]", "progress", 6), ("beta_run", "beta_run", 0),
        ("psi_rank", "psi_rank", 0), ("p_t [95% CI]", "p_t", 7), ("unif", "p_t_uniform", 1), ("psi", "psi", 5),
        ("blocked", "blocked", 2), ("beta", "beta", 4), ("beta_eff", "beta_eff", 3),
    ]
    setting = Column("setting", justify="left", kind="wrap", floor=40)  # ids whole before optional columns stay
    cols = {key: Column(header, justify="left" if key == "p_t" else "right", drop=drop) for header, key, drop in spec}
    verdict = Column("verdict", justify="left")
    for r in doc["settings"]:
        m = r["model"]
        setting.cells.append(_t(r["id"], "bold green" if r["id"] == chosen else ""))
        values = {
            "score": pct(m.get("score")), "progress": drop_interval(m.get("progress"), m.get("progress_lo"), m.get("progress_hi")),
            "beta_run": pct(m.get("beta_run"), 0), "psi_rank": num(m["psi_rank"], ".2f"),
            "p_t": interval(m["p_t"], m["p_t_lo"], m["p_t_hi"]), "p_t_uniform": num(m["p_t_uniform"], ".2f"),
            "psi": num(m["psi"], ".2f"), "blocked": pct(m["blocked"], 0), "beta": pct(m["beta"]),
            "beta_eff": pct(m["beta_eff"], 0),
        }
        for key, value in values.items():
            cols[key].cells.append(Text(value))
        sev = severity.get(r["id"], "ok")
        verdict.cells.append(Text(sev, style=SEVERITY_STYLE[sev]))
    caption = []
    if rec is not None:
        caption.append(visible(f"recommended: {chosen}") if chosen else "no probed setting passes every error rule")
    title = (f"Probe bursts: {d['steps']} steps each, looking ahead {d.get('train_steps', 1000)} training steps; "
             "score = predicted loss drop over the run")
    return fitted_table(title, [setting, *cols.values(), verdict], options.width, caption)


def _dynamic_layer_table(doc: Doc, setting: Mapping[str, Any], options: RenderOptions) -> Table:
    verdicts = layer_verdicts(doc, setting["id"])
    rank = {"error": 0, "warning": 1, "info": 2, "ok": 3}
    layers = list(setting["layers"])
    trained = [(i, layer) for i, layer in enumerate(layers) if layer["trainable"]]
    frozen = len(layers) - len(trained)
    trained.sort(key=lambda p: (rank[verdicts.get(p[1]["name"], ("ok", []))[0]], p[0]))
    shown = trained if options.max_rows <= 0 else trained[: options.max_rows]
    name = Column("layer", justify="left", kind="name")
    spec = [("psi", 4), ("psi_rank", 0), ("r_star", 0), ("beta", 0), ("beta_eff", 2), ("p_t surr", 3)]
    cols = {header: Column(header, drop=drop) for header, drop in spec}
    hist = Column("|du|/ULP", justify="left", drop=1)
    verdict = Column("verdict", justify="left", kind="wrap", floor=15)
    verdict.comfort = max((len(verdict_label(v)) + 1 for _, vs in verdicts.values() for v in vs), default=0)
    for _, m in shown:
        sev, vs = verdicts.get(m["name"], ("ok", []))
        name.cells.append(_t(m["name"]))
        values = [num(m["psi"], ".2f"), num(m["psi_rank"], ".2f"), str(m["r_star"]) if m["r_star"] is not None else "-",
                  pct(m["beta"]), pct(m["beta_eff_elem"], 0), num(m["p_t_surrogate"], ".2f")]
        for col, value in zip(cols.values(), values, strict=True):
            col.cells.append(Text(value))
        hist.cells.append(Text(sparkline(ordered_hist(m["ulp_hist"]))))
        verdict.cells.append(_t(", ".join(verdict_label(v) for v in vs) if vs else "ok", SEVERITY_STYLE[sev]))
    caption = ["beta_eff: activation cells changed; |du|/ULP: proposed steps, bins 1/64..64"]
    if frozen:
        caption.append(f"{frozen} untrained layers not shown")
    if len(shown) < len(trained):
        caption.append(f"+{len(trained) - len(shown)} more layers (--max-rows 0 shows all)")
    title = Text(f"Layers of {visible(setting['id'])}, most severe first")
    return fitted_table(title, [name, *cols.values(), hist, verdict], options.width, caption)


def _recommendation(doc: Doc) -> Panel:
    rec = doc["recommendation"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    if rec["setting"]:
        grid.add_row("setting", _t(rec["setting"], "bold green"))
    else:
        grid.add_row("setting", Text("none of the probed settings passes", style="bold red"))
    grid.add_row("why", _t(rec["reason"]))
    snippet = peft_snippet(rec)
    if snippet:
        grid.add_row("PEFT", _t(snippet))
    if rec.get("rank_pattern"):
        pattern = ", ".join(f"{k}: {v}" for k, v in rec["rank_pattern"].items())
        grid.add_row("rank advice", _t(f"the gradient of these layers escapes rank {rec['base_rank']}: {pattern} "
                                       "(a rank_pattern did not beat the uniform rank on the validation suite)"))
    if rec["keep_finer"]:
        grid.add_row("keep finer", _t(", ".join(rec["keep_finer"])))
    return Panel(grid, title="Recommendation", title_align="left", box=box.ROUNDED)


def build_report(doc: Doc, options: RenderOptions) -> Group:
    parts: list[RenderableType] = [_summary(doc), _model_table(doc, options.width), _layer_table(doc, options)]
    focus = focus_setting(doc)
    if doc["dynamic"] is not None and focus is not None:
        parts.append(_settings_table(doc, options))
        parts.append(_dynamic_layer_table(doc, focus, options))
        if doc["recommendation"] is not None:
            parts.append(_recommendation(doc))
    findings = _findings(doc, options)
    if findings is not None:
        parts.append(findings)
    skipped = skipped_rules(doc)
    notes = list(doc["notes"])
    if skipped:
        notes.append(f"{len(skipped)} rules skipped, never evaluated: {', '.join(sorted(skipped))}")
    if doc["static"]["skipped_tensors"]:
        notes.append(f"{len(doc['static']['skipped_tensors'])} non-float tensors not audited")
    parts.extend(_t(f"note: {note}", "dim") for note in notes)
    return Group(*parts)


@register_formatter
class TableFormatter(Formatter):
    name = "table"
    machine = False
    suffix = ".txt"

    def render_document(self, doc: Doc, options: RenderOptions) -> str:
        buf = io.StringIO()
        console = Console(
            file=buf,
            force_terminal=options.color,
            no_color=not options.color,
            color_system="256" if options.color else None,
            width=options.width,
            highlight=False,
            emoji=False,
            markup=False,
        )
        console.print(build_report(doc, options))
        return buf.getvalue()
