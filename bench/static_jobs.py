"""--jobs: the static audit in 1 and N processes against the floor of reading the checkpoint.

    python bench/static_jobs.py [--gb 1.2] [--jobs 1,2] [--formats bf16,fp8_e4m3] [--dir bench/out/static_ckpt]

Uses bench/static_throughput.py's checkpoint (written once, reused) and its floor
(read every tensor with safetensors and sum it, in a fresh process). Then, each in a
fresh process, `hallway-audit CKPT --jobs N --format json` for every N, plus --jobs 1
with one torch thread (OMP_NUM_THREADS=1: on a busy machine torch's default of a
thread per core can be many times slower), with HALLWAY_AUDIT_PARALLEL_FROM_MB=0 so
every N > 1 really runs in N processes. Prints wall seconds, MB/s, floor/audit ratio,
the speed-up over --jobs 1, peak memory of the parent and of each worker against the
largest tensor, the load average, and whether every report is byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from static_throughput import FLOOR, child, make_checkpoint  # bench/ is not a package: found by the path above

# The audit as the CLI runs it, with the workers' own figures collected (run_parallel's
# stats hook) so each worker's peak memory is known, not sampled.
AUDIT = r"""
import json, resource, sys, time
import hallway_audit.static.parallel as par
workers = []
_run = par.run_parallel
par.run_parallel = lambda *a, **k: _run(*a, **k, stats=workers.extend)
from hallway_audit.cli import main
start = time.perf_counter()
code = main([sys.argv[1], "--precision", sys.argv[2], "--format", "json", "--output", sys.argv[3], "--quiet",
             "--jobs", sys.argv[4]])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "code": code,
                  "workers": [vars(w) for w in workers]}, separators=(",", ":")))
"""


def run_audit(ckpt: Path, formats: str, report: Path, jobs: int, *, one_thread: bool) -> dict:
    env = {"HALLWAY_AUDIT_PARALLEL_FROM_MB": "0"}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        (line,) = child(AUDIT, str(ckpt), formats, str(report), str(jobs))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--jobs", default="1,2", help="comma-separated --jobs values (1 is always run)")
    ap.add_argument("--formats", default="bf16,fp8_e4m3")
    ap.add_argument("--dir", type=Path, default=Path(__file__).parent / "out" / "static_ckpt")
    args = ap.parse_args()
    jobs = sorted({1, *(int(j) for j in args.jobs.split(","))})
    t0 = time.perf_counter()
    nbytes, largest = make_checkpoint(args.dir, args.gb)
    print(f"checkpoint: {nbytes / 1e9:.2f} GB in {len(list(args.dir.glob('*.safetensors')))} shards, largest tensor "
          f"{largest / 1e6:.0f} MB (prepared in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs, "
          f"load average before {os.getloadavg()[0]:.2f}")
    child(FLOOR, str(args.dir))  # warm the page cache
    floor_s = float(child(FLOOR, str(args.dir))[0])
    runs: list[tuple[str, dict, Path]] = []
    out = args.dir.parent
    for n in jobs:
        for one_thread in ((False, True) if n == 1 else (False,)):
            label = f"jobs {n}" + (" (1 thread)" if one_thread else "")
            report = out / f"static_jobs_{n}{'_t1' if one_thread else ''}.json"
            runs.append((label, run_audit(args.dir, args.formats, report, n, one_thread=one_thread), report))
    mb = nbytes / 1e6
    base = runs[0][1]["seconds"]
    print(f"{'':22}{'seconds':>9}{'MB/s':>8}{'floor/audit':>13}{'vs jobs 1':>11}{'parent RSS/largest':>20}"
          f"{'worker peak RSS/largest':>26}")
    print(f"{'floor (read + sum)':22}{floor_s:9.2f}{mb / floor_s:8.0f}")
    for label, r, _ in runs:
        peaks = " ".join(f"{w['peak_rss'] / largest:.1f}" for w in r["workers"]) or "-"
        print(f"{label:22}{r['seconds']:9.2f}{mb / r['seconds']:8.0f}{floor_s / r['seconds']:13.3f}"
              f"{base / r['seconds']:11.2f}{r['rss'] / largest:20.1f}{peaks:>26}")
    for label, r, _ in runs:
        for w in r["workers"]:
            print(f"  {label} worker {w['pid']}: {w['tasks']} tasks, {w['bytes'] / 1e6:.0f} MB, RSS {w['start_rss'] / 1e6:.0f} MB "
                  f"after opening the checkpoint, peak while measuring {w['peak_rss'] / 1e6:.0f} MB "
                  f"(+{(w['peak_rss'] - w['start_rss']) / largest:.1f} x the largest tensor)")
    same = all(filecmp.cmp(runs[0][2], report, shallow=False) for _, _, report in runs[1:])
    print(f"reports byte-identical across runs: {same}; exit codes {[r['code'] for _, r, _ in runs]}; "
          f"load average after {os.getloadavg()[0]:.2f} (formats {args.formats})")


if __name__ == "__main__":
    main()
