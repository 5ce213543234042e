"""Cost of counting boundary crossings, the probe's per-step work on every weight.

    python bench/crossings.py [--numel 20000000] [--formats bf16,fp16,fp8_e4m3,fp4_e2m1]

For each format: a weight tensor of NUMEL values (randn * 0.02, like an initialized
model) and the same after one AdamW-sized step (lr 1e-4 times a random sign), counted
two ways in the same run: the baseline compares the two tensors' `cell_id`s (what the
probe did before), the new way asks the lattice `cells_differ` (a plain float compares
its nearest roundings). Prints the median time of 5 runs of each and their ratio; the
counts must agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hallway_audit.lattice import Lattice, get_format


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=20_000_000)
    ap.add_argument("--formats", default="bf16,fp16,fp8_e4m3,fp4_e2m1")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(args.numel, generator=gen) * 0.02
    after = before + 1e-4 * torch.randint(0, 2, (args.numel,), generator=gen).mul(2).sub(1)
    print(f"{args.numel:,} weights, {torch.get_num_threads()} threads")
    for name in args.formats.split(","):
        lat = get_format(name).at(before)

        def old(lat: Lattice = lat) -> int:
            return int(torch.count_nonzero(lat.cell_id(after) != lat.cell_id(before)))

        def new(lat: Lattice = lat) -> int:
            return int(torch.count_nonzero(lat.cells_differ(before, after)))

        assert old() == new()
        t_old, t_new = median_seconds(old), median_seconds(new)
        print(f"{name:10s} cell_id pair {t_old * 1e3:8.1f} ms   cells_differ {t_new * 1e3:8.1f} ms   "
              f"ratio {t_old / t_new:.2f}x   ({old() / args.numel:.2%} changed)")


if __name__ == "__main__":
    main()
