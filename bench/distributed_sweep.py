"""The same sweep as one process and as torchrun ranks on the CPU (gloo): wall time and speed-up.

    python bench/distributed_sweep.py [--model example|1m|5m] [--settings 4] [--procs 2]
                                      [--steps 8] [--samples 64] [--repeat 1] [--device cpu|cuda]

Each run is a fresh `python -m hallway_audit` (the single process, the baseline) or
`python -m torch.distributed.run --nproc-per-node N -m hallway_audit` with the same
flags, timed from start to exit (imports, model load and the static pass included),
with OMP_NUM_THREADS=1 in every process (torchrun's default; the audit's own choice for
small models). The reports are compared: the ranked run must write the single
process's JSON byte for byte. The ratio is single / ranked wall time (above 1: faster).
The load average is printed before and after: on a shared machine, other processes
competing for the cores lower the speed-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
OUT = REPO / "bench" / "out"
EXAMPLE = REPO / "examples" / "tiny-llama"
SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab, seq (as bench/scaling.py)
    "1m": (128, 2, 4, 2, 352, 2000, 64),
    "5m": (256, 4, 4, 2, 704, 4000, 64),
}
RANKS = ["8", "16", "full", "32", "64"]  # with bf16 and fp8_e4m3: --settings 2, 4, 6, 8 or 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model(name: str, tmp: Path) -> Path:
    if name == "example":
        return EXAMPLE
    import dynamic_cost

    dynamic_cost.SIZES.update(SIZES)
    return dynamic_cost.build_llama(name, tmp / name)


def _flags(model: Path, settings: int, steps: int, samples: int) -> list[str]:
    if settings < 2 or settings % 2 or settings // 2 > len(RANKS):
        raise SystemExit(f"--settings {settings}: choose 2, 4, 6, 8 or 10 (bf16 and fp8_e4m3 x that many ranks / 2)")
    return [str(model), "--calib", str(model / "calib.safetensors"), "--precision", "bf16,fp8_e4m3",
            "--rank", ",".join(RANKS[: settings // 2]), "--steps", str(steps), "--samples", str(samples), "-q",
            "--format", "json"]


def _run(cmd: list[str], out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    done = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="example", choices=["example", *SIZES])
    ap.add_argument("--settings", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: each rank on cuda:LOCAL_RANK (--procs <= GPUs)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(args.model, Path(tmp))
        flags = [*_flags(model, args.settings, args.steps, args.samples), "--device", args.device]
        single_cmd = [sys.executable, "-m", "hallway_audit", *flags]
        load_before = os.getloadavg()
        print(f"model {args.model}, {args.settings} settings x {args.steps} steps x {args.samples} samples; "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
        single, ranked = [], []
        for _ in range(args.repeat):
            single.append(_run(single_cmd, OUT / "distributed_1.json"))
            ranked_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.procs),
                          "--master-port", str(_free_port()), "-m", "hallway_audit", *flags]
            ranked.append(_run(ranked_cmd, OUT / f"distributed_{args.procs}.json"))
        same = (OUT / "distributed_1.json").read_bytes() == (OUT / f"distributed_{args.procs}.json").read_bytes()
        load_after = os.getloadavg()
        t1, tn = min(single), min(ranked)
        print(f"{'run':28}{'wall s':>10}{'ratio':>8}")
        print(f"{'1 process (baseline)':28}{t1:>10.1f}{1.0:>8.2f}")
        print(f"{f'{args.procs} processes (torchrun)':28}{tn:>10.1f}{t1 / tn:>8.2f}")
        print(f"same JSON report: {'yes' if same else 'NO'}; load average after "
              f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
