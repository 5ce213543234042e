"""Turn ground truth, audits and trial runs into the figures of the report (JSON + Markdown).

Definitions (README.md states and justifies them):
* progress  = (L0 - L_N) / L0 of the held-out loss after N steps, mean over seeds;
* stuck     = mean progress < max(10% of the subject's best mean progress, 2 x the
              subject's median seed-to-seed standard deviation);
* regret    = best progress among the settings no more expensive than the recommended
              one (rank <= its rank, bits <= its bits) minus the recommended setting's progress.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from stats import confusion, rates, spearman, spearman_bootstrap
from trainer import RunResult, Setting

STUCK_FRACTION = 0.10
BOOTSTRAP_SEED = 0  # resamples of the settings behind every Spearman interval
NOISE_MULTIPLE = 2.0
#: audit figures whose Spearman vs progress the report shows (if the JSON has them)
PREDICTORS = ("psi", "psi_rank", "p_t", "p_t_lo", "p_t_val", "p_t_descent", "beta", "beta_min", "beta_eff", "beta_proposed",
              "beta_run", "run_moving", "burst_drop", "burst_val_drop", "progress", "progress_val", "score", "score_growth",
              "verdict_score", "gate", "fewer_errors")
#: recommend.py's tolerance: the cheapest passing setting whose score is >= (1 - REGRET) x the best passing score
REGRET = 0.10


def _late(run: RunResult) -> float:
    """Progress made in the second half of the run, (L_{N/2} - L_N) / L0: does training still move at the end?"""
    half = min(run.heldout, key=lambda sl: abs(sl[0] - run.steps / 2))
    return (half[1] - run.heldout[-1][1]) / run.l0


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def cheapest(rows: list[dict[str, Any]], passes: str, score: str | None = None) -> dict[str, Any] | None:
    """The tool's recommendation rule (hallway_audit/recommend.py): among the passing settings,
    those whose score is within REGRET of the best passing score (all, without scores), then the
    lowest rank (full last), then the fewest bits, then the higher score (grid order without scores)."""
    ok = [r for r in rows if r.get(passes)]
    if score is not None:
        vals = [_score(r, score) for r in ok]
        if ok and any(math.isfinite(v) for v in vals):
            best = max(v for v in vals if math.isfinite(v))
            ok = [r for r, v in zip(ok, vals, strict=True) if math.isfinite(v) and v >= (1 - REGRET) * best]

    def tie(r: dict[str, Any]) -> float:
        v = _score(r, score) if score is not None else math.nan
        return -v if math.isfinite(v) else math.inf

    return min(ok, key=lambda r: (r["cost"], tie(r), r["index"])) if ok else None


def _score(row: dict[str, Any], name: str) -> float:
    value = row["scores"].get(name, math.nan) if name in row.get("scores", {}) else row.get(name, math.nan)
    return float(value) if value is not None else math.nan


def regret(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> dict[str, Any]:
    best = max(r["progress"] for r in rows)
    if chosen is None:
        return {"setting": None, "progress": None, "regret_cheaper": None, "regret_best": best}
    rank, bits = chosen["cost"]
    cheaper = [r["progress"] for r in rows if r["cost"][0] <= rank and r["cost"][1] <= bits]
    return {"setting": chosen["id"], "progress": chosen["progress"],
            "regret_cheaper": max(cheaper) - chosen["progress"], "regret_best": best - chosen["progress"]}


def analyse(subject: Any, settings: list[Setting], truth: dict[str, list[RunResult]],
            audits: dict[str, dict[str, Any]], trials: dict[str, RunResult], trial_steps: tuple[int, ...]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for i, s in enumerate(settings):
        runs = truth[s.id]
        prog = [r.progress() for r in runs]
        a = audits.get(s.id, {})
        row: dict[str, Any] = {
            "index": i, "id": s.id, "cost": [s.cost_order[0] if math.isfinite(s.cost_order[0]) else 1e9, s.bits],
            "progress": statistics.fmean(prog), "progress_sd": statistics.stdev(prog) if len(prog) > 1 else 0.0,
            "progress_seeds": prog, "l0": runs[0].l0, "truth_wall_s": sum(r.wall_s for r in runs),
            "late_progress": statistics.fmean(_late(r) for r in runs),
            "audit_passed": a.get("passed"), "audit_error": a.get("error"), "audit_wall_s": a.get("wall_s"),
            "audit_fired": a.get("fired", []), "scores": dict(a.get("scores", {})),
        }
        if a.get("passed") is not None:
            row["scores"]["gate"] = 1.0 if a["passed"] else 0.0
            row["scores"]["fewer_errors"] = -row["scores"].get("errors", math.nan)
        t = trials.get(s.id)
        if t is not None:
            for k in trial_steps:
                row[f"trial{k}"] = t.progress(k)
                row[f"trial{k}_cost_s"] = t.step_seconds[k - 1] + 2 * t.eval_seconds
        rows.append(row)
    best = max(r["progress"] for r in rows)
    noise = statistics.median(r["progress_sd"] for r in rows)
    threshold = max(STUCK_FRACTION * best, NOISE_MULTIPLE * noise)
    for r in rows:
        r["trains"] = r["progress"] >= threshold
    actual = [r["trains"] for r in rows]
    progress = [r["progress"] for r in rows]

    corr: dict[str, dict[str, float]] = {}
    for name in PREDICTORS:
        xs = [r["scores"].get(name, math.nan) for r in rows]
        if all(not math.isfinite(x) for x in xs):
            continue
        rho, n = spearman(xs, progress)
        corr[name] = {"rho": rho, "n": n}
    for k in trial_steps:
        if f"trial{k}" in rows[0]:
            rho, n = spearman([r[f"trial{k}"] for r in rows], progress)
            corr[f"trial{k}"] = {"rho": rho, "n": n}
    # how sure: intervals for the score, each trial, and the score minus each trial (paired)
    versus = {}
    trial_keys = [f"trial{k}" for k in trial_steps if f"trial{k}" in corr]
    scored = [r for r in rows if math.isfinite(r["scores"].get("score", math.nan))]
    if "score" in corr and trial_keys and scored:
        ys = [r["progress"] for r in scored]
        columns = [[r["scores"]["score"] for r in scored], *([r[t] for r in scored] for t in trial_keys)]
        intervals = spearman_bootstrap(columns, ys, seed=BOOTSTRAP_SEED)
        for name, (lo, hi) in zip(["score", *trial_keys], intervals, strict=False):
            corr[name].update(lo=lo, hi=hi)
        rho = [spearman(xs, ys)[0] for xs in columns]
        for t, other, (lo, hi) in zip(trial_keys, rho[1:], intervals[len(columns):], strict=True):
            versus[t] = {"difference": rho[0] - other, "lo": lo, "hi": hi}

    gate = confusion([r["audit_passed"] for r in rows], actual)
    classifiers = {"audit gate": gate}
    recs = {"audit": regret(rows, cheapest(rows, "audit_passed", "score"))}
    for k in trial_steps:
        key = f"trial{k}"
        if key not in rows[0]:
            continue
        top = max(r[key] for r in rows)
        for r in rows:
            r[f"{key}_pass"] = r[key] >= STUCK_FRACTION * top and r[key] > 0
        classifiers[f"trial {k} steps"] = confusion([r[f"{key}_pass"] for r in rows], actual)
        recs[f"trial {k} steps"] = regret(rows, cheapest(rows, f"{key}_pass", key))
        recs[f"trial {k} steps (argmax)"] = regret(rows, max(rows, key=lambda r, key=key: r[key]))

    audit_walls = [r["audit_wall_s"] for r in rows if r["audit_wall_s"] is not None]
    costs = {"truth_total_s": sum(r["truth_wall_s"] for r in rows),
             "audit_total_s": sum(audit_walls), "audit_per_call_s": statistics.fmean(audit_walls) if audit_walls else None}
    for k in trial_steps:
        if f"trial{k}_cost_s" in rows[0]:
            costs[f"trial{k}_per_setting_s"] = statistics.fmean(r[f"trial{k}_cost_s"] for r in rows)
    out = {"subject": subject.name, "description": subject.description, "meta": subject.meta,
           "best_progress": best, "noise_sd": noise, "stuck_threshold": threshold,
           "n_settings": len(rows), "n_trains": sum(actual),
           "n_audited": sum(r["audit_passed"] is not None for r in rows),
           "audit_fingerprints": sorted({a["fingerprint"] for a in audits.values() if a.get("fingerprint")}), "rows": rows, "spearman": corr,
           "score_vs_trials": versus,
           "classifiers": classifiers, "recommendations": recs, "costs": costs}
    if subject.meta.get("planted_layers"):
        out["planted"] = planted_check(subject.meta, settings, audits)
    stalls = decay_stalls(settings, truth, audits, trials)
    if stalls:
        out["decay_stalls"] = stalls
    return out


#: a 10-step interval of a run without master weights "stalls" when it drops the loss by less
#: than this fraction of what its fp32-master twin drops in the same interval
STALL_RATIO = 0.5


def truth_stall_step(nomaster: list[RunResult], master: list[RunResult]) -> int | None:
    """The first evaluation step from which every later interval of the no-master runs (mean
    over seeds) drops the held-out loss by less than STALL_RATIO of the master twin's drop."""
    def drops(runs: list[RunResult]) -> list[tuple[int, float]]:
        steps = [s for s, _ in runs[0].heldout]
        mean = [statistics.fmean(r.heldout[i][1] for r in runs) for i in range(len(steps))]
        return [(steps[i], mean[i] - mean[i + 1]) for i in range(len(steps) - 1)]

    a, b = drops(nomaster), drops(master)
    stall = None
    for (step, d_nm), (_, d_m) in zip(reversed(a), reversed(b), strict=True):
        if d_m > 0 and d_nm < STALL_RATIO * d_m:
            stall = step
        else:
            break
    return stall


def decay_stalls(settings: list[Setting], truth: dict[str, list[RunResult]], audits: dict[str, dict[str, Any]],
                 trials: dict[str, RunResult]) -> list[dict[str, Any]]:
    """Decaying schedules without master weights (nearest rounding) next to their fp32-master
    twins: where the real run stops improving, where the audit says it will, and what an
    8-step trial shows (the ratio of the two runs' progress: ~1, it cannot see the decay)."""
    out = []
    for s in settings:
        if s.schedule == "constant" or s.master != "none" or s.rounding != "nearest" or s.rank:
            continue
        twin = next((t for t in settings if t.master == "fp32" and t.precision == s.precision and t.lr == s.lr
                     and t.schedule == s.schedule and t.rank == s.rank and t.lr_min == s.lr_min), None)
        if twin is None:
            continue
        a = audits.get(s.id, {}).get("scores", {})
        t_nm, t_m = trials.get(s.id), trials.get(twin.id)
        trial8 = (t_nm.progress(8) / t_m.progress(8)) if t_nm and t_m and t_m.progress(8) > 0 else None
        runs = truth[s.id]
        out.append({"setting": s.id, "twin": twin.id, "truth_stall_step": truth_stall_step(runs, truth[twin.id]),
                    "steps": runs[0].steps, "audit_stall_step": a.get("stall_step"),
                    "audit_run_realized": a.get("run_realized"),
                    "audit_warns": any(f.startswith("run-stalls-in-decay") for f in audits.get(s.id, {}).get("warned", [])),
                    "trial8_ratio": trial8,
                    "progress": statistics.fmean(r.progress() for r in runs),
                    "twin_progress": statistics.fmean(r.progress() for r in truth[twin.id])})
    return out


def _interval(d: dict[str, float] | None) -> str:
    if not d:
        return "n/a"
    return f"{d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def planted_check(meta: dict[str, Any], settings: list[Setting], audits: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per LoRA setting: which layers the audit says need a higher rank, r_star of the planted
    ones, and whether each is within a factor 2 of the planted rank (the issue's bar)."""
    planted = set(meta["planted_layers"])
    rank = meta["planted_rank"]
    out = []
    for s in settings:
        a = audits.get(s.id)
        if not s.rank or not a or a.get("passed") is None:
            continue
        flagged = {f["layer"] for f in a.get("rank_findings", []) if f.get("layer")}
        r_star = {lay["name"]: lay.get("r_star") for lay in a.get("layers", []) if lay.get("trainable")}
        others = [v for k, v in r_star.items() if k not in planted and isinstance(v, (int, float))]
        out.append({"setting": s.id, "flagged": len(flagged), "planted_flagged": sorted(flagged & planted),
                    "others_flagged": len(flagged - planted),
                    "r_star_planted": {k: r_star.get(k) for k in sorted(planted)},
                    # over the planted layers this setting adapts (an attention-only plan has no r_star for an MLP)
                    "r_star_within_2x": bool(adapted := [r_star[k] for k in planted if isinstance(r_star.get(k), int)])
                    and all(rank / 2 <= r <= 2 * rank for r in adapted),
                    "r_star_others_median": statistics.median(others) if others else None})
    return out


# ---------------------------------------------------------------- Markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# hallway-audit validation report", ""]
    run = doc["run"]
    lines += [f"Run: {run['subjects']} | {run['steps']} steps x {run['seeds']} seeds (micro-batch 8) | audit "
              f"`--steps {run['audit_steps']} --samples {run['audit_samples']}` | trials {run['trial_steps']} "
              f"| tool fingerprint {run['fingerprint']} (git {run['git']}) | suite wall {run['wall_s']:.0f} s", ""]
    lines += ["Definitions: progress = (L0 - L_N)/L0 of a fixed 256-example held-out loss, mean over seeds; "
              f"a setting is *stuck* when its progress < max({STUCK_FRACTION:.0%} of the subject's best, "
              f"{NOISE_MULTIPLE:g} x the subject's median seed-to-seed sd); gate positive = passes = predicts "
              "'trains'; regret = best progress among settings no more expensive (rank and bits) than the "
              "recommended one, minus the recommended one's.", ""]
    subjects = doc["subjects"]
    # summary: Spearman
    names: list[str] = []
    for s in subjects:
        names += [n for n in s["spearman"] if n not in names]
    lines += ["## Summary: Spearman of each predictor vs realized progress", ""]
    body = []
    for n in names:
        vals = [s["spearman"].get(n, {}).get("rho", math.nan) for s in subjects]
        finite = [v for v in vals if math.isfinite(v)]
        body.append([n, *(_f(v, 2) for v in vals), _f(statistics.fmean(finite), 2) if finite else "n/a"])
    lines += [*_table(["predictor", *(s["subject"] for s in subjects), "mean"], body), ""]
    if any(s.get("score_vs_trials") for s in subjects):
        lines += ["Spearman of `score` minus a k-step trial's, with a 95% percentile-bootstrap interval "
                  "(2000 resamples of the settings, paired):", ""]
        ks = sorted({k for s in subjects for k in s.get("score_vs_trials", {})}, key=lambda k: int(k[5:]))
        body = [[f"score - {k}", *(_interval(s.get("score_vs_trials", {}).get(k)) for s in subjects)] for k in ks]
        lines += [*_table(["", *(s["subject"] for s in subjects)], body), ""]
    lines += ["## Summary: classifiers (balanced accuracy; tp/fn/fp/tn, positive = trains)", ""]
    cls_names: list[str] = []
    for s in subjects:
        cls_names += [n for n in s["classifiers"] if n not in cls_names]
    body = []
    for n in cls_names:
        found = [c for s in subjects if (c := s["classifiers"].get(n)) is not None]
        pooled = rates({key: sum(c[key] for c in found) for key in ("tp", "fn", "fp", "tn")})
        cells = ["n/a" if c is None else f"{_f(c['balanced_accuracy'], 2)} ({int(c['tp'])}/{int(c['fn'])}/{int(c['fp'])}/{int(c['tn'])})"
                 for c in [*(s["classifiers"].get(n) for s in subjects), pooled]]
        body.append([n, *cells])
    lines += [*_table(["classifier", *(s["subject"] for s in subjects), "pooled"], body), ""]
    lines += ["## Summary: recommendation regret (vs best no more expensive / vs best overall)", ""]
    body = []
    rec_names: list[str] = []
    for s in subjects:
        rec_names += [n for n in s["recommendations"] if n not in rec_names]
    for n in rec_names:
        cells = []
        for s in subjects:
            r = s["recommendations"].get(n)
            if r is None:
                cells.append("n/a")
            elif r["setting"] is None:
                cells.append(f"none passes (best {_f(r['regret_best'], 2)})")
            else:
                cells.append(f"`{r['setting']}` {_f(r['regret_cheaper'], 2)} / {_f(r['regret_best'], 2)}")
        body.append([n, *cells])
    lines += [*_table(["chooser", *(s["subject"] for s in subjects)], body), ""]
    lines += ["## Summary: wall cost", ""]
    body = []
    for s in subjects:
        c = s["costs"]
        trial_cells = [f"{_f(c.get(f'trial{k}_per_setting_s'), 2)}" for k in run["trial_steps"]]
        body.append([s["subject"], f"{c['truth_total_s']:.0f}", f"{c['audit_total_s']:.0f}", _f(c["audit_per_call_s"], 1),
                     *trial_cells])
    lines += [*_table(["subject", "ground truth total s", "audit total s", "audit s/call", *(f"trial {k} s/setting" for k in run["trial_steps"])], body), ""]

    for s in subjects:
        lines += [f"## {s['subject']}", "", s["description"], "",
                  f"best progress {_f(s['best_progress'])}, seed noise sd {_f(s['noise_sd'])}, stuck below "
                  f"{_f(s['stuck_threshold'])}; {s['n_trains']}/{s['n_settings']} settings train; "
                  f"{s['n_audited']}/{s['n_settings']} audited (tool fingerprints {', '.join(s['audit_fingerprints']) or '-'}).", ""]
        show = [n for n in ("psi", "p_t_lo", "beta", "beta_eff", "burst_drop", "progress", "score") if n in s["spearman"]]
        ks = [k for k in run["trial_steps"] if f"trial{k}" in s["rows"][0]]
        body = []
        for r in s["rows"]:
            gate = "ERR" if r["audit_error"] else ("-" if r["audit_passed"] is None else ("pass" if r["audit_passed"] else "fail"))
            body.append([f"`{r['id']}`", f"{_f(r['progress'])} ± {_f(r['progress_sd'])}", _f(r["late_progress"]),
                         "no" if r["trains"] else "**stuck**",
                         gate, *(_f(r["scores"].get(n, math.nan), 2) for n in show),
                         *(_f(r[f"trial{k}"]) for k in ks), ", ".join(x.split(":")[0] for x in r["audit_fired"])])
        lines += _table(["setting", "progress", "2nd half", "stuck", "gate", *show, *(f"trial{k}" for k in ks), "errors fired"], body)
        errs = [r for r in s["rows"] if r["audit_error"]]
        if errs:
            lines += ["", "Audit errors: " + "; ".join(f"`{r['id']}`: {r['audit_error']}" for r in errs)]
        if s.get("decay_stalls"):
            lines += ["", "Decay stalls (nearest rounding without master weights vs the fp32-master twin; truth: the "
                      f"first step from which every 10-step interval drops the loss by < {STALL_RATIO:.0%} of the twin's):", ""]
            body = [[f"`{d['setting']}`", f"{_f(d['progress'])} vs {_f(d['twin_progress'])}",
                     str(d["truth_stall_step"]) if d["truth_stall_step"] is not None else "none",
                     _f(d["audit_stall_step"], 0) if d["audit_stall_step"] is not None else "-",
                     _f(d["audit_run_realized"], 2) if d["audit_run_realized"] is not None else "-",
                     "yes" if d["audit_warns"] else "no",
                     _f(d["trial8_ratio"], 2) if d["trial8_ratio"] is not None else "-"] for d in s["decay_stalls"]]
            lines += _table(["setting", "progress vs twin", "truth stall step", "audit stall_step", "audit run_realized",
                             "run-stalls-in-decay", "trial 8: progress / twin's"], body)
        if s.get("planted"):
            lines += ["", f"Planted change: rank {s['meta']['planted_rank']} in {', '.join(s['meta']['planted_layers'])}.", ""]
            body = [[f"`{p['setting']}`", str(p["flagged"]), ", ".join(p["planted_flagged"]) or "-", str(p["others_flagged"]),
                     ", ".join(f"{k.split('model.')[-1]}={v}" for k, v in p["r_star_planted"].items()),
                     "yes" if p.get("r_star_within_2x") else "**no**",
                     str(p["r_star_others_median"])] for p in s["planted"]]
            lines += _table(["setting", "layers flagged needs_higher_rank", "planted flagged", "others flagged",
                             "r_star planted", "within 2x of planted", "r_star others (median)"], body)
        lines.append("")
    return "\n".join(lines) + "\n"
