"""Markdown for PR comments and CI step summaries (GitHub-flavoured tables).

Rendered from the JSON document. Strings from a checkpoint, plan or rule file go
through escape.md_code (names: code spans) or escape.md_text (messages), so none
can end a line, a table cell, or open a header, link or HTML tag.
"""

from __future__ import annotations

from .base import Formatter, RenderOptions, register_formatter
from .escape import md_code, md_text
from .rows import (
    Doc,
    drop_interval,
    focus_setting,
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
    sqnr,
    verdict_label,
)

_ICON = {"error": "❌", "warning": "⚠️", "info": "ℹ️", "ok": "✅"}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Cells are already escaped (md_code / md_text / our own numbers)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _more(hidden: int, what: str) -> list[str]:
    return ["", f"_+{hidden} more {what} (--max-rows 0 shows all; the JSON report lists every one)._"] if hidden else []


def _dynamic_sections(doc: Doc, options: RenderOptions) -> list[str]:
    dyn, rec = doc["dynamic"], doc["recommendation"]
    if dyn is None or not doc["settings"]:
        return []
    severity = setting_severity(doc)
    lines = [
        "",
        "### Probe bursts",
        "",
        f"{md_text(dyn['model'])}; loss {md_code(dyn['loss'], in_table=False)}; {dyn['train_examples']} train / "
        f"{dyn['val_examples']} held-out examples ({dyn['tokens']} tokens); {dyn['steps']} steps per setting, seed {dyn['seed']}.",
        "",
    ]
    rows = []
    for r in doc["settings"]:
        m = r["model"]
        star = " ⭐" if rec is not None and rec["setting"] == r["id"] else ""
        sev = severity.get(r["id"], "ok")
        rows.append([
            f"{md_code(r['id'])}{star}", pct(m.get("score")),
            drop_interval(m.get("progress"), m.get("progress_lo"), m.get("progress_hi")), pct(m.get("beta_run"), 0),
            num(m["psi_rank"], ".2f"), interval(m["p_t"], m["p_t_lo"], m["p_t_hi"]), pct(m["beta"]),
            pct(m["beta_eff"], 0), f"{_ICON[sev]} {sev}",
        ])
    lines += _table(["setting", "score", "progress [95% CI]", "beta_run", "psi_rank", "p_t [95% CI]", "beta", "beta_eff", "verdict"], rows)
    if rec is not None:
        lines += ["", "### Recommendation", ""]
        if rec["setting"]:
            lines.append(f"**{md_code(rec['setting'], in_table=False)}**: {md_text(rec['reason'])}.")
        else:
            lines.append(f"**None**: {md_text(rec['reason'])}.")
        snippet = peft_snippet(rec)
        if snippet:
            # A fenced block shows the snippet verbatim; it is one line (names are JSON-quoted), and a
            # fence longer than any backtick run in it cannot be closed early.
            fence = "`" * max(3, _longest_run(snippet, "`") + 1)
            lines += ["", "PEFT configuration of the recommended setting:", "", f"{fence}python", snippet, fence]
        if rec.get("rank_pattern"):
            pattern = ", ".join(f"{md_code(k, in_table=False)}: {v}" for k, v in rec["rank_pattern"].items())
            lines += ["", f"Layers whose gradient escapes rank {rec['base_rank']} (advice): {pattern}"]
        if rec["keep_finer"]:
            lines += ["", "Keep in a finer format: " + ", ".join(md_code(m, in_table=False) for m in rec["keep_finer"])]
        focus = focus_setting(doc)
        verdicts = layer_verdicts(doc, focus["id"]) if focus is not None else {}
        flagged = [(name, v) for name, v in verdicts.items() if v[0] != "ok"]
        if flagged and focus is not None:
            metrics = {layer["name"]: layer for layer in focus["layers"]}
            shown = flagged if options.max_rows <= 0 else flagged[: options.max_rows]
            lines += ["", f"Layers of {md_code(focus['id'], in_table=False)} with findings:", ""]
            body = []
            for n, (sev, vs) in shown:
                m = metrics.get(n, {})
                body.append([
                    md_code(n), num(m.get("psi"), ".2f"), num(m.get("psi_rank"), ".2f"), "-" if m.get("r_star") is None else str(m["r_star"]),
                    pct(m.get("beta")), f"{_ICON[sev]} {md_text(', '.join(verdict_label(x) for x in vs))}",
                ])
            lines += _table(["layer", "psi", "psi_rank", "r_star", "beta", "verdict"], body)
            lines += _more(len(flagged) - len(shown), "layers")
    return lines


def _longest_run(text: str, ch: str) -> int:
    longest = run = 0
    for c in text:
        run = run + 1 if c == ch else 0
        longest = max(longest, run)
    return longest


def _updates(st: Doc) -> str:
    """How the plan updates weights (schema >= 1.7): whether "cannot move" applies."""
    u = st.get("updates")
    if not u:
        return ""
    return f" (master weights {md_text(', '.join(u['master_weights']))}, rounding {md_text(', '.join(u['rounding']))})"


@register_formatter
class MarkdownFormatter(Formatter):
    name = "markdown"
    machine = True
    suffix = ".md"

    def render_document(self, doc: Doc, options: RenderOptions) -> str:
        ck, st, gate = doc["checkpoint"], doc["static"], doc["gate"]
        counts = severity_counts(doc)
        status = "passed ✅" if gate["passed"] else "failed ❌"
        lines = [
            f"## hallway-audit: gate {status}",
            "",
            f"{md_code(ck['path'], in_table=False)} ({md_text(ck['format'])}): {human_count(ck['params'])} params in "
            f"{ck['tensors']} tensors, {human_bytes(ck['bytes'])}. "
            f"Formats {', '.join(md_code(f, in_table=False) for f in st['formats'])} at lr {st['lr']:g}{_updates(st)}; "
            f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} info (fail-on {md_text(gate['fail_on'])}).",
            "",
            "### Whole model",
            "",
        ]
        model_rows = []
        for fmt in st["formats"]:
            s = st["model"]["formats"][fmt]
            model_rows.append(
                [md_code(fmt), num(s["rel_error"]), sqnr(s), pct(s["saturated"], 3), pct(s["flushed"], 3), pct(s["beta_pred"])]
            )
        lines += _table(["format", "rel err", "SQNR dB", "saturated", "flushed", "beta_pred"], model_rows)
        lines += _dynamic_sections(doc, options)
        found = doc["findings"]
        if found:
            shown = found if options.max_rows <= 0 else found[: options.max_rows]
            lines += ["", "### Findings", ""]
            lines += _table(
                ["", "rule", "layer", "setting", "message"],
                [[_ICON[f["severity"]], md_code(f["rule"]), md_code(f["layer"]) if f["layer"] else "(model)",
                  md_code(f["setting"]) if f["setting"] else "", md_text(f["message"])] for f in shown],
            )
            lines += _more(len(found) - len(shown), "findings")
        rows = ranked_layers(doc)
        shown_rows = rows if options.max_rows <= 0 else rows[: options.max_rows]
        lines += ["", "### Layers", ""]
        header = ["layer", "params"] + [f"beta_pred {md_text(f)}" for f in st["formats"]] + ["verdict"]
        body = []
        for row in shown_rows:
            cells = [md_code(row.layer["name"]), human_count(row.layer["params"])]
            cells += [pct(row.layer["formats"][f]["beta_pred"]) for f in st["formats"]]
            cells.append(f"{_ICON[row.worst]} {md_text(', '.join(verdict_label(v) for v in row.verdicts) or 'ok')}")
            body.append(cells)
        lines += _table(header, body)
        lines += _more(len(rows) - len(shown_rows), "layers")
        skipped = skipped_rules(doc)
        notes = [md_text(n) for n in doc["notes"]]
        if skipped:
            notes.append(f"skipped rules: {', '.join(md_code(r, in_table=False) for r in sorted(skipped))}")
        if notes:
            lines += [""] + [f"> {n}" for n in notes]
        return "\n".join(lines) + "\n"
