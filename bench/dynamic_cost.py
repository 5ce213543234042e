"""Dynamic-audit cost in units of one plain training step of the same model.

    python bench/dynamic_cost.py [--models example,20m] [--settings 3] [--steps 8] [--samples 64] [--device cpu]
    python bench/dynamic_cost.py --models 1b --device cuda      # the GPU run (issue 4)

For each model (the bundled example; a ~20M and a ~100M parameter Llama built
locally from a config, random weights, random tokens): the time of one plain
training step (forward, backward, AdamW step) on one micro-batch, measured in the
same run (median of 5 after 2 warm-up steps), then the wall time of a full
`audit()` of N settings (8-step bursts, 64 p_t samples, all metrics). Prints the
audit's time per setting divided by the plain step time (goal: <= 20 steps), and
on CUDA the peak GPU memory of each side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab, seq
    "20m": (512, 4, 8, 4, 1408, 8000, 64),
    "100m": (768, 12, 12, 4, 2048, 16000, 64),
    "1b": (2048, 18, 16, 8, 5632, 32000, 128),  # ~0.98B parameters
}
SETTINGS = [("bf16", "8"), ("bf16", "32"), ("fp8_e4m3", "8"), ("bf16", "full"), ("fp8_e4m3", "32"), ("bf16", "16"),
            ("fp8_e4m3", "full"), ("fp8_e4m3", "16")]


def build_llama(size: str, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, seq = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq * 2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (32, seq), generator=g)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, str(out / "calib.safetensors"))
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else float("nan")


def plain_step_seconds(model_dir: Path, micro_batch: int, device: str = "cpu") -> tuple[float, int, float]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _peak_reset(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    batch = load_file(str(model_dir / "calib.safetensors"))
    mb = {k: v[:micro_batch].to(device) for k, v in batch.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(7):
        _sync(device)
        t = time.perf_counter()
        loss = model(**mb).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    params = sum(p.numel() for p in model.parameters())
    peak = _peak_gb(device)
    del model, opt
    return statistics.median(times), params, peak


def audit_seconds(model_dir: Path, n_settings: int, steps: int, samples: int, device: str = "cpu") -> tuple[float, list[str], float]:
    from hallway_audit.audit import DynamicPlan, audit
    from hallway_audit.probe import BurstOptions, SweepSpec

    chosen = SETTINGS[:n_settings]
    ids: list[str] = []
    total = 0.0
    _peak_reset(device)
    for precision, rank in chosen:  # one setting per call: per-setting wall time, same code path as the CLI
        spec = SweepSpec(precision=[precision], rank=[0 if rank == "full" else int(rank)], lr=[1e-4])
        t = time.perf_counter()
        result = audit(model_dir, formats=[precision], device=device, dynamic=DynamicPlan(
            calib=str(model_dir / "calib.safetensors"), sweep=spec, burst=BurstOptions(steps=steps, samples=samples)))
        total += time.perf_counter() - t
        ids += [s.id for s in result.dynamic.settings]
    return total, ids, _peak_gb(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="example,20m")
    ap.add_argument("--settings", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.settings} settings x {args.steps} steps, "
          f"{args.samples} p_t samples")
    print(f"device {args.device}")
    print(f"{'model':10}{'params':>14}{'plain step s':>14}{'audit s':>10}{'s/setting':>11}{'steps/setting':>15}"
          f"{'step GB':>9}{'audit GB':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = REPO / "examples" / "tiny-llama" if name == "example" else build_llama(name, Path(tmp) / name)
            step, params, step_gb = plain_step_seconds(model_dir, 8, args.device)
            seconds, _, audit_gb = audit_seconds(model_dir, args.settings, args.steps, args.samples, args.device)
            per = seconds / args.settings
            print(f"{name:10}{params:>14,}{step:>14.4f}{seconds:>10.1f}{per:>11.2f}{per / step:>15.1f}"
                  f"{step_gb:>9.1f}{audit_gb:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
