"""Is a planted rank the rank training needs, and does the audit's r_star see it?

A planted-rank subject checks rank verdicts against a known answer only where the
planted rank is the rank training needs. For each candidate plant (a rank-4 change with
equal singular values, 10x the weight's norm, as `subjects.plant`) this prints:

* how many of the copy task's answers the target changes;
* r_star (smallest rank whose top singular values hold 90% of the gradient's norm, as
  hallway_audit.probe.psi.r_star) of every linear layer's gradient at the start, on the
  subject's 64-example calibration batch: what the audit reads;
* the held-out progress of LoRA restricted to the planted layers (PEFT, alpha = r,
  AdamW lr 1e-3, 200 steps of 8 examples) at r = 1, 2, 4, 8, and of full fine-tuning
  of those layers: no probe code, the rank training needs.

The README's "Does it predict?" and subjects.PLANTED_LAYERS quote its output.

    python validation/planted_identifiability.py [--steps 200]   # ~40 s on 2 vCPUs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import subjects  # validation's own module, next to this file

CANDIDATES = (
    ("model.layers.0.self_attn.q_proj",),  # the first version's attention plant
    ("model.layers.0.self_attn.v_proj",),
    ("model.layers.1.self_attn.o_proj",),
    ("model.layers.1.mlp.down_proj",),
    subjects.PLANTED_LAYERS,  # the subject as built
)
RANKS = (1, 2, 4, 8)


def r_star(g: torch.Tensor, tau: float = 0.9) -> int:
    s = torch.linalg.svdvals(g.double())
    captured = ((s**2).cumsum(0) / (s**2).sum()).sqrt()
    return int((captured >= tau).nonzero()[0]) + 1


def load() -> torch.nn.Module:
    return subjects._hf_load(subjects.EXAMPLES / "tiny-llama", "LlamaForCausalLM")()


def progress(target: torch.nn.Module, layers: tuple[str, ...], rank: int, steps: int) -> float:
    """Held-out progress of training only `layers` (LoRA of `rank`, or fully when rank is 0)."""
    torch.manual_seed(0)  # PEFT draws A from the global generator: the same draw on every call
    model = load()
    if rank:
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(layers), lora_dropout=0.0))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(f"{layer}.") for layer in layers))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    held = subjects.planted_batch(256, torch.Generator().manual_seed(subjects.HELDOUT_SEED), target)
    with torch.no_grad():
        start = model(**held).loss.item()
    for t in range(steps):
        batch = subjects.planted_batch(8, torch.Generator().manual_seed(10_000 + t), target)
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    with torch.no_grad():
        return (start - model(**held).loss.item()) / start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    tiny = subjects._tiny()
    for layers in CANDIDATES:
        start = time.perf_counter()
        target = subjects.plant(load(), layers).eval()
        batch = subjects.planted_batch(64, torch.Generator().manual_seed(subjects.CALIB_SEED), target)
        student = load().eval()
        with torch.no_grad():
            own = student(input_ids=batch["input_ids"]).logits.argmax(-1)[:, tiny.SPAN : -1]
        changed = (own != batch["labels"][:, tiny.SPAN + 1 :]).float().mean().item()
        student.zero_grad()
        student(**batch).loss.backward()
        stars = {n.removesuffix(".weight"): r_star(p.grad) for n, p in student.named_parameters()
                 if p.ndim == 2 and n.startswith("model.layers.")}
        trained = {r: progress(target, layers, r, args.steps) for r in (*RANKS, 0)}
        others = sorted(v for k, v in stars.items() if k not in layers)
        print(f"plant in {', '.join(layers)}: {changed:.0%} of the answers change", flush=True)
        print(f"  gradient r_star: planted {', '.join(f'{k}={stars[k]}' for k in layers)}; others {others}")
        print("  progress training only the planted layers: "
              + ", ".join(f"r{r} {trained[r]:.3f}" for r in RANKS)
              + f", full {trained[0]:.3f}; r1 / r8 = {trained[1] / trained[8]:.2f}"
              + f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
