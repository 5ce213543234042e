"""Can any gradient-based estimate see the planted rank of the planted attention layer?

Trains the planted subject's student with plain AdamW (full fine-tuning, no probe code)
and prints, at a few steps, r_star (smallest rank whose top singular values hold 90% of
the gradient's norm, as hallway_audit.probe.psi.r_star) of the gradient and of the
update accumulated since step 0, for the planted layers and two unplanted neighbours,
and at step 0 the same for the gradient whitened by the layer's input covariance
(G (X^T X / n + lambda I)^-1, a Newton step for that layer alone). The README's
"Does it predict?" quotes its output.

    python validation/planted_identifiability.py [--lr 1e-3] [--steps 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import subjects  # validation's own module, next to this file

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",  # planted
          "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj")  # not planted
REPORT_AT = (0, 1, 8, 32, 64, 128)


def r_star(g: torch.Tensor, tau: float = 0.9) -> int:
    s = torch.linalg.svdvals(g.double())
    captured = ((s**2).cumsum(0) / (s**2).sum()).sqrt()
    return int((captured >= tau).nonzero()[0]) + 1


def whitened_r_star(model: torch.nn.Module, batch: dict[str, torch.Tensor], damping: float = 1e-2) -> dict[str, int]:
    inputs: dict[str, list[torch.Tensor]] = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: inputs.setdefault(n, []).append(i[0].detach()))
             for n in LAYERS]
    model.zero_grad()
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    out = {}
    for n in LAYERS:
        x = torch.cat(inputs[n]).reshape(-1, inputs[n][0].shape[-1]).double()
        cov = x.T @ x / x.shape[0]
        cov += damping * torch.linalg.eigvalsh(cov).mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        g = mods[n].weight.grad.double()
        out[n] = r_star(torch.linalg.solve(cov, g.T).T)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = subjects._hf_load(subjects.EXAMPLES / "tiny-llama", "LlamaForCausalLM")()
    batch = subjects.planted_batch(64, torch.Generator().manual_seed(subjects.CALIB_SEED))
    params = dict(model.named_parameters())
    start = {n: params[f"{n}.weight"].detach().clone() for n in LAYERS}
    print("whitened gradient r_star at step 0:", whitened_r_star(model, batch))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(args.steps + 1):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step in REPORT_AT or step == args.steps:
            cells = {n: (r_star(params[f"{n}.weight"].grad), r_star(params[f"{n}.weight"].detach() - start[n]) if step else 0)
                     for n in LAYERS}
            print(f"step {step:4d} loss {loss.item():.3f}  (gradient r_star, update r_star): {cells}")
        opt.step()


if __name__ == "__main__":
    main()
