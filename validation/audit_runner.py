"""Run the audit CLI as a user would, one setting per call, and read its JSON.

Results are cached under out/audit/ keyed by subject, setting, the exact argument
list and a fingerprint of the tool's source and bundled rules, so a change to the
rules (or any module) re-runs the audit while unchanged reruns are free.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from subjects import ROOT, Subject
from trainer import Setting

#: the checkout whose hallway_audit the CLI runs (`python -m hallway_audit` from there);
#: run.py --tool-root points it at another one, e.g. a git worktree of an older commit
TOOL_ROOT = ROOT

AUDIT_VERSION = 1


def tool_fingerprint() -> str:
    """sha256 over hallway_audit/**/*.py and rules/*.yaml: what decides the audit's answer."""
    h = hashlib.sha256()
    files = sorted((TOOL_ROOT / "hallway_audit").rglob("*.py")) + sorted((TOOL_ROOT / "rules").glob("*.yaml"))
    for f in files:
        h.update(str(f.relative_to(TOOL_ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def supported_flags() -> frozenset[str]:
    """The audit's options, read from its --help (flags are being added while the suite is used)."""
    proc = subprocess.run([sys.executable, "-m", "hallway_audit", "audit", "--help"], cwd=TOOL_ROOT,
                          capture_output=True, text=True, check=False)
    return frozenset(re.findall(r"--[a-z][a-z0-9-]+", proc.stdout))


def plan_flags(setting: Setting, run_steps: int) -> list[str]:
    """The planned run as the audit can be told it: its length and lr schedule, where the CLI has the flags."""
    have = supported_flags()
    out: list[str] = []
    if "--train-steps" in have:
        out += ["--train-steps", str(run_steps)]
    if setting.schedule != "constant" and {"--schedule", "--warmup", "--lr-min"} <= have:
        warm = max(1, math.ceil(setting.warmup * run_steps))
        out += ["--schedule", setting.schedule, "--warmup", str(warm), "--lr-min", f"{setting.lr_min:g}"]
    return out


def audit_args(subject: Subject, setting: Setting, steps: int, samples: int, extra: list[str],
               run_steps: int | None = None) -> list[str]:
    """The command line for one setting; with run_steps, the planned run's length and schedule too."""
    return [
        str(subject.ckpt), "--calib", str(subject.calib),
        "--precision", setting.precision,
        "--rank", str(setting.rank) if setting.rank else "full",
        "--lr", f"{setting.lr:g}",
        # LoRA: adapters in fp32 keep their own precision; stored in bf16 (PEFT on a bf16 model)
        # the optimizer steps them on that lattice, with no fp32 copy (the trainer does the same)
        "--master-weights", setting.master if setting.rank == 0 else ("fp32" if setting.adapters == "fp32" else "none"),
        *(["--adapter-precision", setting.adapters] if setting.rank and setting.adapters != "fp32" else []),
        "--rounding", setting.rounding,
        "--targets", setting.targets,
        "--steps", str(steps), "--samples", str(samples),
        *subject.audit_args, *(plan_flags(setting, run_steps) if run_steps else []), *extra,
    ]


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def scores(doc: dict[str, Any], setting_id: str | None = None) -> dict[str, float]:
    """Candidate predictors from the audit JSON of one setting (the first, or the one with that id)."""
    settings = doc.get("settings") or []
    s = settings[0] if setting_id is None else next((x for x in settings if x.get("id") == setting_id), None)
    if not s:
        return {}
    m = s.get("model", {})
    out = {k: _num(m.get(k)) for k in ("psi", "psi_rank", "p_t", "p_t_lo", "p_t_val", "p_t_descent", "beta", "beta_min",
                                       "beta_eff", "beta_eff_elem", "beta_proposed", "p_t_uniform", "beta_run",
                                       "run_moving", "run_realized", "stall_step", "horizon", "horizon_growth",
                                       "lora_kappa", "lora_accel", "progress", "progress_lo", "progress_val",
                                       "score", "score_growth")}
    l0, l1 = _num(m.get("initial_loss")), _num(m.get("loss"))
    v0, v1 = _num(m.get("initial_val_loss")), _num(m.get("val_loss"))
    out["burst_drop"] = (l0 - l1) / l0 if l0 else math.nan
    out["burst_val_drop"] = (v0 - v1) / v0 if v0 else math.nan
    for key in ("score", "verdict_score"):  # a per-setting score outside `model`, if the schema has one
        if key in s:
            out[key] = _num(s[key])
    if all(not math.isfinite(v) for k, v in out.items() if k in ("progress", "score")):
        out.pop("progress")
        out.pop("score")
    errors = [f for f in doc.get("findings", []) if f.get("severity") == "error"
              and f.get("setting") in (s.get("id"), None)]
    out["errors"] = float(len(errors))
    return out


def run_audit(out: Path, subject: Subject, setting: Setting, steps: int = 32, samples: int = 32,
              extra: list[str] | None = None, fingerprint: str | None = None, reuse: bool = False,
              cache_only: bool = False, run_steps: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """One CLI call (cached): {rc, passed, wall_s, error, scores, rules fired, args}.

    `threads` caps the call's CPU threads (HALLWAY_AUDIT_THREADS) when calls run side by
    side: two audits of a 22.7M-parameter model, each on torch's default of one thread per
    core, took ~1300 s each on 2 vCPUs; one alone takes 90 s.

    A cached answer is reused when it was made by the same tool source (fingerprint),
    or by any source with `reuse` (a baseline taken while the tree is being edited).
    """
    args = audit_args(subject, setting, steps, samples, extra or [], run_steps)
    fp = fingerprint or tool_fingerprint()
    # keyed by the command line alone: subjects sharing a checkpoint and calib (reversal and
    # schedule: the audit has no lr schedule) share the answer
    where = [] if TOOL_ROOT == ROOT else [str(TOOL_ROOT)]
    # the calibration file's bytes too: a rebuilt subject must not reuse answers about the old one
    calib = hashlib.sha256(Path(subject.calib).read_bytes()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([AUDIT_VERSION, args, calib, *where]).encode()).hexdigest()[:16]
    path = out / "audit" / f"{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = None
        if cached is not None and (reuse or cached.get("fingerprint") == fp):
            saved = path.with_suffix(".audit.json")
            if cached.get("scores") and saved.is_file():  # re-read: a predictor added since appears without re-auditing
                cached["scores"] = scores(json.loads(saved.read_text()))
            return cached
    if cache_only:
        return {"args": args, "fingerprint": None, "rc": None, "wall_s": None, "passed": None, "error": None,
                "scores": {}, "fired": [], "reason": "not audited (cache only)"}
    path.parent.mkdir(parents=True, exist_ok=True)
    report = path.with_suffix(".audit.json")
    cmd = [sys.executable, "-m", "hallway_audit", *args, "--format", "json", "-o", str(report), "--quiet"]
    start = time.perf_counter()
    env = dict(os.environ)
    if threads is not None and "HALLWAY_AUDIT_THREADS" not in env and "OMP_NUM_THREADS" not in env:
        env["HALLWAY_AUDIT_THREADS"] = str(max(1, threads))
    proc = subprocess.run(cmd, cwd=TOOL_ROOT, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"args": args, "fingerprint": fp, "rc": proc.returncode, "wall_s": wall,
                              "passed": None, "error": None, "scores": {}, "fired": [], "reason": None}
    if proc.returncode in (0, 1) and report.is_file():
        doc = json.loads(report.read_text())
        result["passed"] = bool(doc["gate"]["passed"])
        result["reason"] = doc["gate"].get("reason")
        result["scores"] = scores(doc)
        result["warned"] = sorted({f"{f['rule']}:{f['severity']}" for f in doc.get("findings", [])
                                   if f.get("severity") == "warning"})
        result["fired"] = sorted({f"{f['rule']}:{f['severity']}" for f in doc.get("findings", [])
                                  if f.get("severity") == "error"})
        result["rank_findings"] = [
            {"layer": f.get("layer"), "message": f.get("message")} for f in doc.get("findings", [])
            if f.get("verdict") == "needs_higher_rank"
        ]
        layers = (doc.get("settings") or [{}])[0].get("layers", [])
        result["layers"] = [{k: v for k, v in layer.items() if k in
                             ("name", "psi", "psi_rank", "r_star", "beta", "planned_rank", "trainable")}
                            for layer in layers]
        result["recommendation"] = (doc.get("recommendation") or {}).get("setting")
    else:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        result["error"] = lines[-1] if lines else f"exit {proc.returncode}"
    if proc.returncode != 70:  # an internal error (a tree mid-edit, a bug) is not an answer worth keeping
        path.write_text(json.dumps(result))
    return result
