"""How the dynamic audit's cost grows: with model size, number of settings, p_t samples.

    python bench/scaling.py [--sizes 1m,5m,20m] [--settings 1,2,4] [--samples 16,32,64]

Each row is measured in the same run as the plain training step of the same model
(forward, backward, AdamW step on one 8-example micro-batch), and reported both in
seconds and in plain steps; peak RSS is the process's high-water mark so far. The
growth rate is the least-squares slope of log(time) against log(x).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import dynamic_cost  # noqa: E402  (model builder and plain-step timer)

dynamic_cost.SIZES.update({  # hidden, layers, heads, kv heads, intermediate, vocab, seq
    "1m": (128, 2, 4, 2, 352, 2000, 64),
    "5m": (256, 4, 4, 2, 704, 4000, 64),
})


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else float("nan")


def audit_time(model_dir: Path, settings: int, samples: int, steps: int) -> float:
    from hallway_audit.audit import DynamicPlan, audit
    from hallway_audit.probe import BurstOptions, SweepSpec

    ranks = [8, 16, 32, 64, 4, 2, 128, 1][:settings]
    spec = SweepSpec(precision=["bf16"], rank=ranks, lr=[1e-4])
    t = time.perf_counter()
    audit(model_dir, formats=["bf16"], device="cpu",
          dynamic=DynamicPlan(calib=str(model_dir / "calib.safetensors"), sweep=spec,
                              burst=BurstOptions(steps=steps, samples=samples)))
    return time.perf_counter() - t


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1m,5m,20m")
    ap.add_argument("--settings", default="1,2,4")
    ap.add_argument("--samples", default="16,32,64")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {s: dynamic_cost.build_llama(s, Path(tmp) / s) for s in sizes}
        print(f"{'axis':10}{'value':>8}{'params':>12}{'plain step s':>14}{'audit s':>10}{'in steps':>10}{'peak RSS MB':>13}")
        by_size = []
        for s in sizes:
            step, params, _ = dynamic_cost.plain_step_seconds(dirs[s], 8)
            t = audit_time(dirs[s], 1, 64, args.steps)
            by_size.append((params, t))
            print(f"{'size':10}{s:>8}{params:>12,}{step:>14.4f}{t:>10.1f}{t / step:>10.0f}{rss_mb():>13.0f}")
        small = dirs[sizes[0]]
        step, params, _ = dynamic_cost.plain_step_seconds(small, 8)
        by_settings = []
        for n in (int(x) for x in args.settings.split(",")):
            t = audit_time(small, n, 64, args.steps)
            by_settings.append((n, t))
            print(f"{'settings':10}{n:>8}{params:>12,}{step:>14.4f}{t:>10.1f}{t / step:>10.0f}{rss_mb():>13.0f}")
        by_samples = []
        for n in (int(x) for x in args.samples.split(",")):
            t = audit_time(small, 1, n, args.steps)
            by_samples.append((n, t))
            print(f"{'samples':10}{n:>8}{params:>12,}{step:>14.4f}{t:>10.1f}{t / step:>10.0f}{rss_mb():>13.0f}")
    for name, rows in (("params", by_size), ("settings", by_settings), ("samples", by_samples)):
        if len(rows) > 1:
            print(f"growth with {name}: time ~ {name}^{slope([r[0] for r in rows], [r[1] for r in rows]):.2f}")


if __name__ == "__main__":
    main()
