"""Static-audit throughput and peak memory against the floor of reading the checkpoint.

    python bench/static_throughput.py [--gb 1.2] [--formats bf16,fp8_e4m3] [--dir bench/out]

Writes a sharded checkpoint of mixed fp32/bf16 tensors (once; reused if present),
then, each in a fresh process so peak RSS is its own:
  floor  read every tensor with safetensors and reduce it once (a sum);
  audit  `hallway-audit CKPT --precision FORMATS --format json` (the full static audit).
Prints MB/s of both, their ratio (audit / floor, higher is better) and each peak
RSS against the largest tensor's size. The floor runs first to warm the page cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FLOOR = r"""
import resource, sys, time, torch
from safetensors import safe_open
from pathlib import Path
files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
start = time.perf_counter(); acc = 0.0
for f in files:
    with safe_open(str(f), framework="pt") as h:
        for k in h.keys():
            acc += float(h.get_tensor(k).float().sum())
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, acc)
"""

AUDIT = r"""
import resource, sys, time
from hallway_audit.cli import main
start = time.perf_counter()
code = main([sys.argv[1], "--precision", sys.argv[2], "--format", "json", "--output", sys.argv[3], "--quiet"])
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, code)
"""


def make_checkpoint(out: Path, gb: float) -> tuple[int, int]:
    """A transformer-shaped checkpoint: 4096-wide blocks, fp32 MLPs, bf16 attention."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    marker = out / "DONE.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta["gb"] == gb:
            return meta["bytes"], meta["largest"]
    for f in out.glob("*.safetensors"):
        f.unlink()
    g = torch.Generator().manual_seed(0)
    total, largest, layer, shard = 0, 0, 0, 0
    target = int(gb * 1e9)
    d = 2048
    while total < target:
        tensors = {
            f"layers.{layer}.attn.qkv.weight": (torch.randn(3 * d, d, generator=g) * 0.02).to(torch.bfloat16),
            f"layers.{layer}.attn.o.weight": (torch.randn(d, d, generator=g) * 0.02).to(torch.bfloat16),
            f"layers.{layer}.mlp.up.weight": torch.randn(4 * d, d, generator=g) * 0.02,
            f"layers.{layer}.mlp.down.weight": torch.randn(d, 4 * d, generator=g) * 0.02,
            f"layers.{layer}.norm.weight": torch.ones(d),
        }
        save_file(tensors, str(out / f"model-{shard:05d}.safetensors"))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        largest = max(largest, *(t.numel() * t.element_size() for t in tensors.values()))
        total += size
        layer += 1
        shard += 1
    marker.write_text(json.dumps({"gb": gb, "bytes": total, "largest": largest}))
    return total, largest


def child(code: str, *args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--formats", default="bf16,fp8_e4m3")
    ap.add_argument("--dir", type=Path, default=Path(__file__).parent / "out" / "static_ckpt")
    args = ap.parse_args()
    t0 = time.perf_counter()
    nbytes, largest = make_checkpoint(args.dir, args.gb)
    print(f"checkpoint: {nbytes / 1e9:.2f} GB in {len(list(args.dir.glob('*.safetensors')))} shards, "
          f"largest tensor {largest / 1e6:.0f} MB (prepared in {time.perf_counter() - t0:.0f} s)")
    child(FLOOR, str(args.dir))  # warm the page cache
    floor_s, floor_rss, _ = (float(x) for x in child(FLOOR, str(args.dir)))
    report = args.dir.parent / "static_report.json"
    audit_s, audit_rss, code = (float(x) for x in child(AUDIT, str(args.dir), args.formats, str(report)))
    mb = nbytes / 1e6
    print(f"{'':8}{'seconds':>10}{'MB/s':>10}{'peak RSS MB':>14}{'RSS/largest':>13}")
    for name, s, rss in (("floor", floor_s, floor_rss), ("audit", audit_s, audit_rss)):
        print(f"{name:8}{s:10.2f}{mb / s:10.0f}{rss / 1e6:14.0f}{rss / largest:13.2f}")
    print(f"throughput ratio audit/floor: {floor_s / audit_s:.3f} (formats {args.formats}; goal >= 0.5)")
    print(f"gate exit code {int(code)}; report {report}")


if __name__ == "__main__":
    main()
