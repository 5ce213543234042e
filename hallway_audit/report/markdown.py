"""Markdown for PR comments and CI step summaries (GitHub-flavoured tables)."""

from __future__ import annotations

from .base import Formatter, RenderOptions, register_formatter
from .rows import (
    human_bytes,
    human_count,
    interval,
    layer_verdicts,
    num,
    pct,
    peft_snippet,
    ranked_layers,
    setting_severity,
    severity_counts,
    skipped_rules,
    verdict_label,
)

_ICON = {"error": "❌", "warning": "⚠️", "info": "ℹ️", "ok": "✅"}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _dynamic_sections(result, options: RenderOptions) -> list[str]:
    dyn, rec = result.dynamic, result.recommendation
    if dyn is None or not dyn.settings:
        return []
    severity = setting_severity(result)
    lines = [
        "",
        "### Probe bursts",
        "",
        f"{dyn.model_source}; loss `{dyn.loss_name}`; {dyn.train_examples} train / {dyn.val_examples} held-out examples "
        f"({dyn.tokens} tokens); {dyn.options.steps} steps per setting, seed {dyn.options.seed}.",
        "",
    ]
    rows = []
    for r in dyn.settings:
        m = r.model_metrics()
        star = " ⭐" if rec is not None and rec.setting == r.id else ""
        rows.append([
            f"`{r.id}`{star}", num(m["psi"], ".2f"), num(m["psi_rank"], ".2f"), interval(m["p_t"], m["p_t_lo"], m["p_t_hi"]),
            num(m["p_t_uniform"], ".2f"), pct(m["blocked"], 0), pct(m["beta"]), pct(m["beta_eff"], 0),
            f"{m['loss_delta']:+.3g}", f"{_ICON[severity.get(r.id, 'ok')]} {severity.get(r.id, 'ok')}",
        ])
    lines += _table(["setting", "psi", "psi_rank", "p_t [95% CI]", "p_t uniform", "blocked", "beta", "beta_eff", "Δloss", "verdict"], rows)
    if rec is not None:
        lines += ["", "### Recommendation", ""]
        if rec.setting:
            lines.append(f"**`{rec.setting}`**: {rec.reason}.")
        else:
            lines.append(f"**None**: {rec.reason}.")
        snippet = peft_snippet(rec)
        if snippet:
            lines += ["", "Per-layer ranks (PEFT):", "", "```python", snippet, "```"]
        if rec.keep_finer:
            lines += ["", "Keep in a finer format: " + ", ".join(f"`{m}`" for m in rec.keep_finer)]
        focus = rec.focus
        verdicts = layer_verdicts(result, focus)
        flagged = [(name, v) for name, v in verdicts.items() if v[0] != "ok"]
        if flagged:
            r = next(s for s in dyn.settings if s.id == focus)
            metrics = r.layer_metrics()
            shown = flagged if options.max_rows <= 0 else flagged[: options.max_rows]
            lines += ["", f"Layers of `{focus}` with findings:", ""]
            lines += _table(
                ["layer", "psi", "psi_rank", "r_star", "beta", "verdict"],
                [[f"`{n}`", num(metrics[n]["psi"], ".2f"), num(metrics[n]["psi_rank"], ".2f"), str(metrics[n]["r_star"]),
                  pct(metrics[n]["beta"]), f"{_ICON[sev]} {', '.join(verdict_label(x) for x in vs)}"] for n, (sev, vs) in shown],
            )
    return lines


@register_formatter
class MarkdownFormatter(Formatter):
    name = "markdown"
    machine = True
    suffix = ".md"

    def render(self, result, options: RenderOptions) -> str:
        ck, st, gate = result.checkpoint, result.static, result.gate
        counts = severity_counts(result)
        status = "passed ✅" if gate.passed else "failed ❌"
        lines = [
            f"## hallway-audit: gate {status}",
            "",
            f"`{ck.path}` ({ck.kind}): {human_count(ck.params)} params in {ck.tensors} tensors, {human_bytes(ck.bytes)}. "
            f"Formats {', '.join(f'`{f}`' for f in st.formats)} at lr {st.lr:g}; "
            f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} info (fail-on {gate.fail_on}).",
            "",
            "### Whole model",
            "",
        ]
        model_rows = []
        for fmt in st.formats:
            s = st.model.formats[fmt].summary()
            model_rows.append(
                [f"`{fmt}`", num(s["rel_error"]), num(s["sqnr_db"], ".1f"), pct(s["saturated"], 3), pct(s["flushed"], 3), pct(s["beta_pred"])]
            )
        lines += _table(["format", "rel err", "SQNR dB", "saturated", "flushed", "beta_pred"], model_rows)
        lines += _dynamic_sections(result, options)
        found = result.findings
        if found:
            shown = found if options.max_rows <= 0 else found[: options.max_rows]
            lines += ["", "### Findings", ""]
            lines += _table(
                ["", "rule", "layer", "setting", "message"],
                [[_ICON[o.rule.severity], f"`{o.rule.id}`", o.subject.layer or "(model)", o.subject.setting or "", o.message] for o in shown],
            )
            if len(shown) < len(found):
                lines += ["", f"_{len(found) - len(shown)} more findings in the JSON report._"]
        rows = ranked_layers(result)
        shown_rows = rows if options.max_rows <= 0 else rows[: options.max_rows]
        lines += ["", "### Layers", ""]
        header = ["layer", "params"] + [f"beta_pred {f}" for f in st.formats] + ["verdict"]
        body = []
        for row in shown_rows:
            cells = [f"`{row.layer.name}`", human_count(row.layer.tally.params)]
            cells += [pct(row.layer.format_metrics(f)["beta_pred"]) for f in st.formats]
            cells.append(f"{_ICON[row.worst]} {', '.join(row.verdicts) or 'ok'}")
            body.append(cells)
        lines += _table(header, body)
        if len(shown_rows) < len(rows):
            lines += ["", f"_{len(rows) - len(shown_rows)} more layers in the JSON report._"]
        skipped = skipped_rules(result)
        notes = list(result.notes) + ([f"skipped rules: {', '.join(f'`{r}`' for r in sorted(skipped))}"] if skipped else [])
        if notes:
            lines += [""] + [f"> {n}" for n in notes]
        return "\n".join(lines) + "\n"
