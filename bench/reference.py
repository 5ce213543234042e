"""The library against the straightforward implementation of the same burst.

    python bench/reference.py [--models example,20m] [--steps 8] [--samples 64] [--rank 8]

The reference is written the way the paper's sketch reads (docs/definitions.md §8):
  * p_t: a Python loop of K samples per proposal, each drawing a fresh micro-batch
    gradient with its own forward and backward, projecting onto S, re-quantizing the
    model and running one forward per sample (and one on the held-out batch); no
    early stopping;
  * S for LoRA through explicit projectors P_A = V V^T (in x in) and P_B = U U^T
    (out x out), rebuilt from a full SVD of A and B whenever they are used;
  * psi_star: an SVD (U, S and V, economy size) of every gradient matrix at every step;
  * every forward re-quantizes every parameter from its float32 value.
It draws its random numbers in the library's order (LoRA init, micro-batches, proposal
noise), so with early stopping off both see the same samples: the table checks that
losses, psi, beta and r_star agree within float tolerance and that p_t agrees sample
for sample, then times both on one LoRA setting (bf16 weights, fp32 master, AdamW).
The library runs twice: at the reference's precision (no early stopping, K samples)
and as shipped (sequential stopping once the Wilson interval excludes 1/2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from dynamic_cost import build_llama  # noqa: E402

from hallway_audit.model import build_model, load_calibration, resolve_loss, split_batch  # noqa: E402
from hallway_audit.model.data import MicroBatches, batch_size, take  # noqa: E402
from hallway_audit.probe import BurstOptions, OptimizerSpec, PrecisionStack, Setting, Subspace, run_sweep  # noqa: E402
from hallway_audit.probe.engine import LossEvaluator  # noqa: E402
from hallway_audit.probe.realize import Realization  # noqa: E402
from hallway_audit.probe.stats import wilson_interval  # noqa: E402
from hallway_audit.probe.targets import param_dict, parameter_universe  # noqa: E402


def full_projector(m: torch.Tensor, side: str) -> torch.Tensor:
    """Orthogonal projector onto col(m) (side "col") or row(m) (side "row"), from an SVD."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    keep = int((s > s[0] * max(m.shape) * torch.finfo(m.dtype).eps).sum()) if s.numel() and float(s[0]) > 0 else 0
    basis = u[:, :keep] if side == "col" else vh[:keep].T
    return basis @ basis.T


class Reference:
    """The burst and p_t as a direct transcription of the definitions."""

    def __init__(self, module, loss_fn, setting: Setting, train, val, options: BurstOptions) -> None:
        self.module, self.loss_fn, self.options = module, loss_fn, options
        self.params = parameter_universe(module)
        self.base = param_dict(module)
        device = next(iter(self.base.values())).device
        self.real = Realization(setting, self.params, self.base, torch.Generator().manual_seed(options.seed),
                                torch.Generator(device=device).manual_seed(options.seed + 1))
        self.fmt = self.real.fmt
        self.train, self.val = train, val
        self.eval_batch = take(train, torch.arange(min(options.eval_batch, batch_size(train))))
        self.eval_val = take(val, torch.arange(min(options.eval_batch, batch_size(val))))
        self.micro = MicroBatches(train, options.micro_batch, options.seed)
        self.linear = [p.name for p in self.params if p.linear]
        self.evaluator = LossEvaluator(module, loss_fn)

    # -- the naive pieces ------------------------------------------------------------
    def quantize_all(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in self.base.items():  # every parameter, every time, from float32
            x = stored[name] if name in stored else w.to(torch.float32)
            out[name] = self.fmt.at(x).quantize(x)
        return out

    def loss(self, weights, batch) -> float:
        with torch.no_grad():
            return float(self._loss(weights, batch))

    def _loss(self, weights, batch) -> torch.Tensor:
        return self.evaluator._call(weights, batch)

    def grad(self, weights, batch) -> dict[str, torch.Tensor]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in weights.items()}
        loss = self._loss(leaves, batch)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads, strict=True)}

    def project(self, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.real.trainable:
            a, b = self.real.phi[name + "::A"].detach(), self.real.phi[name + "::B"].detach()
            p_a, p_b = full_projector(a, "row"), full_projector(b, "col")
            out[name] = p_b @ g[name] + g[name] @ p_a - p_b @ g[name] @ p_a
        return out

    def psi_star_all(self, g: dict[str, torch.Tensor]) -> dict[str, int]:
        """r_star(tau) of every linear layer from its SVD (singular vectors included, as
        torch.linalg.svd gives them; economy size, or the head's U alone would be vocab^2)."""
        out = {}
        for name in self.linear:
            _, s, _ = torch.linalg.svd(g[name].double(), full_matrices=False)
            curve = torch.sqrt(torch.cumsum(s.square(), 0) / s.square().sum())
            out[name] = int(torch.nonzero(curve >= self.options.psi_target - 1e-12)[0]) + 1
        return out

    # -- the burst -------------------------------------------------------------------
    def run(self, setting: Setting) -> dict:
        real, opt_spec = self.real, setting.optimizer
        keys = list(real.phi)
        opt = torch.optim.AdamW([real.phi[k] for k in keys], lr=opt_spec.lr, betas=opt_spec.betas, eps=opt_spec.eps,
                                weight_decay=opt_spec.weight_decay)
        out = {"loss": [], "psi": [], "beta": [], "norms": []}
        out["r_star"] = self.psi_star_all(self.grad(self.quantize_all(real.stored()), self.train))
        snaps = {0: real.snapshot()}
        for _ in range(self.options.steps):
            stored = real.stored()
            g = self.grad(self.quantize_all(stored), self.micro.next())
            self.psi_star_all(g)  # the sketch's per-step psi_star
            proj = self.project(g)
            cap = sum(float(proj[k].double().square().sum()) for k in proj)
            out["psi"].append((cap / sum(float(v.double().square().sum()) for v in g.values())) ** 0.5)
            grads = real.phi_grad(g)
            for k in keys:
                real.phi[k].grad = grads[k]
            opt.step()
            opt.zero_grad(set_to_none=True)
            real.write_back()
            after = real.stored()
            changed = sum(int((self.fmt.at(stored[k]).cell_id(stored[k]) != self.fmt.at(stored[k]).cell_id(after[k])).sum())
                          for k in real.trainable)
            out["beta"].append(changed / sum(stored[k].numel() for k in real.trainable))
            out["norms"].append(sum(float((after[k] - stored[k]).double().square().sum()) for k in real.trainable) ** 0.5)
            out["loss"].append(self.loss(self.quantize_all(after), self.eval_batch))
        snaps[self.options.steps] = real.snapshot()
        radius = statistics.median(out["norms"])
        group = opt.param_groups[0]
        denom = {k: (opt.state[real.phi[k]]["exp_avg_sq"] / (1 - group["betas"][1] ** float(opt.state[real.phi[k]]["step"]))).sqrt()
                 + group["eps"] for k in keys}
        gen = torch.Generator(device=next(iter(self.base.values())).device).manual_seed(self.options.seed + 2)
        out["pt"] = []
        for snap in snaps.values():
            real.restore(snap)
            out["pt"].append(self.pt(radius, denom, gen))
        return out

    def pt(self, radius: float, denom, gen) -> dict:
        real, sigma = self.real, self.options.sigma
        stored = real.stored()
        now = self.quantize_all(stored)
        base, base_val = self.loss(now, self.eval_batch), self.loss(now, self.eval_val)

        def unit(d):
            n = sum(float(v.double().square().sum()) for v in d.values()) ** 0.5
            return {k: v / n for k, v in d.items()} if n > 0 else d

        def trial(u):
            moved = {k: stored[k] + u[k] for k in real.trainable}
            w = self.quantize_all(moved)
            if all(torch.equal(w[k], now[k]) for k in real.trainable):
                return False, False
            return self.loss(w, self.eval_batch) < base, self.loss(w, self.eval_val) < base_val

        counts = {"optimizer": 0, "val": 0, "uniform": 0}
        for _ in range(self.options.samples):
            g_b = self.grad(now, self.micro.next())
            d_phi = {k: v / denom[k] for k, v in real.phi_grad(g_b).items()}
            signal = unit(real.to_weight_space(d_phi))
            z = {k: torch.randn(v.shape, generator=gen, device=v.device) for k, v in signal.items()}
            noise = unit(self.project(z))
            u = {k: -radius * v for k, v in unit({k: signal[k] + sigma * noise[k] for k in signal}).items()}
            down, down_val = trial(u)
            counts["optimizer"] += down
            counts["val"] += down_val
        for _ in range(self.options.samples):
            z = {k: torch.randn(v.shape, generator=gen, device=v.device) for k, v in stored.items()}
            u = {k: radius * v for k, v in unit(self.project(z)).items()}
            counts["uniform"] += trial(u)[0]
        return counts


def library(module, loss_fn, setting, train, val, options):
    return run_sweep(module, settings=[setting], loss_fn=loss_fn, loss_name="ref", train=train, val=val, options=options,
                     model_source="bench", calib="bench", val_source="bench").settings[0]


def interval(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}] n={n}"


def compare(name: str, model_dir: Path, steps: int, samples: int, rank: int) -> None:
    loaded = build_model(model_dir, None, torch.device("cpu"))
    batch = load_calibration(str(model_dir / "calib.safetensors"), tokenizer=loaded.tokenizer, max_length=None,
                             device=torch.device("cpu"))
    train, val = split_batch(batch, 0.25, 0)
    _, loss_fn = resolve_loss(None, loaded, train)
    setting = Setting(PrecisionStack("bf16", None, "nearest", "fp32", scope="all"), Subspace("lora", rank, "all-linear", base="merged"),
                      OptimizerSpec("adamw", 1e-4))
    exact = BurstOptions(steps=steps, samples=samples, early_stop=False)
    t = time.perf_counter()
    ref = Reference(loaded.module, loss_fn, setting, train, val, exact).run(setting)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    same = library(loaded.module, loss_fn, setting, train, val, exact)
    t_same = time.perf_counter() - t
    t = time.perf_counter()
    shipped = library(loaded.module, loss_fn, setting, train, val, BurstOptions(steps=steps, samples=samples))
    t_ship = time.perf_counter() - t

    loss_diff = max(abs(a - s.loss) for a, s in zip(ref["loss"], same.steps, strict=True))
    psi_diff = max(abs(a - s.psi) for a, s in zip(ref["psi"], same.steps, strict=True))
    beta_diff = max(abs(a - s.beta) for a, s in zip(ref["beta"], same.steps, strict=True))
    rstar = {p: d.r_star for p, d in same.layers.items() if d.r_star is not None}
    rstar_ref = {n.removesuffix(".weight"): r for n, r in ref["r_star"].items()}
    rstar_equal = sum(rstar_ref[k] == v for k, v in rstar.items())
    print(f"\n== {name}: LoRA r{rank} all-linear, bf16 weights, {steps} steps, {samples} p_t samples per proposal")
    print(f"agreement: loss max|diff| {loss_diff:.2e}, psi {psi_diff:.2e}, beta {beta_diff:.2e}, "
          f"r_star equal in {rstar_equal}/{len(rstar)} layers")
    print(f"{'state':>6} {'proposal':>10} {'reference':>26} {'library, same K':>26} {'library, shipped':>26}")
    for (state, counts), a, b in zip(zip((0, steps), ref["pt"], strict=True), same.pt, shipped.pt, strict=True):
        for label, key, ra, rb in (("optimizer", "optimizer", a.optimizer, b.optimizer), ("uniform", "uniform", a.uniform, b.uniform),
                                   ("held-out", "val", a.val, b.val)):
            print(f"{state:>6} {label:>10} {interval(counts[key], samples):>26} {interval(ra.successes, ra.n):>26} "
                  f"{interval(rb.successes, rb.n):>26}")
    print(f"{'':>6} {'seconds':>10} {t_ref:>26.1f} {t_same:>26.1f} {t_ship:>26.1f}")
    print(f"speedup over the reference: {t_ref / t_same:.1f}x at the same K (same precision), "
          f"{t_ref / t_ship:.1f}x as shipped (sequential stopping); goal >= 5x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="example,20m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = REPO / "examples" / "tiny-llama" if name == "example" else build_llama(name, Path(tmp) / name)
            compare(name, model_dir, args.steps, args.samples, args.rank)


if __name__ == "__main__":
    main()
