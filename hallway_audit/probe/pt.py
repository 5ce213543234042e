"""p_t, the signal-to-branching ratio: how many admissible moves lower the realized loss.

A move u lives in the update subspace S (in weight space), has norm R (the median
optimizer update norm of the burst) and is quantized: u_q = Q(theta + u) - theta.
It is a descent move when the realized (quantized) loss drops: a finite difference,
not the surrogate gradient. Proposals (docs/definitions.md §6.2, §6.3):

* optimizer: u = -R * normalize(normalize(D g_b) + sigma * normalize(z)), with g_b
  the gradient of a freshly resampled micro-batch for every sample (so samples
  are independent and the Wilson interval is honest), D the optimizer's
  preconditioner, z Gaussian in S — descent-directed, with noise scaled to the
  signal;
* uniform: u uniform on the sphere of radius R in S (an isotropic Gaussian
  projected onto S, normalized).

A move that quantizes to exactly zero is blocked: no descent, counted separately,
and needs no forward. Every rate carries a 95% Wilson interval; sampling stops
early once the interval excludes 1/2 (checked every 8 samples from 16 on).

For LoRA settings g_b comes from each example's share of the training split's
gradient (shares.py), recorded during the backward the surrogate needs anyway, so a
sample costs its moves' forwards only; the first micro-batch at each state is also
computed directly and the shares are used only if they agree with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..model.data import MicroBatches, take
from .engine import Batch, LossEvaluator
from .events import Part
from .realize import Realization
from .shares import COUPLED, FOLDED, ExampleShares, SharesVerdict
from .stats import excludes_half, wilson_interval

Direction = dict[str, Tensor]
FIRST_CHECK = 16  # early stopping looks at a rate from this many samples on, then every 8
# progress(part, sample, layer, layers) after each piece of a state's work: "setup" (its
# losses and gradients), then each "optimizer", "uniform" and per-"layer" sample (1-based)
PtProgress = Callable[[Part, int, int, int], None]


@dataclass
class Rate:
    successes: int = 0
    n: int = 0

    def add(self, success: bool) -> None:
        self.successes += int(success)
        self.n += 1

    @property
    def p(self) -> float | None:
        return self.successes / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | tuple[None, None]:
        return wilson_interval(self.successes, self.n) if self.n else (None, None)

    def __iadd__(self, other: Rate) -> Rate:
        self.successes += other.successes
        self.n += other.n
        return self


@dataclass
class PtAtState:
    step: int
    radius: float
    optimizer: Rate = field(default_factory=Rate)
    blocked: int = 0
    uniform: Rate = field(default_factory=Rate)
    blocked_uniform: int = 0
    val: Rate | None = None
    surrogate: dict[str, Rate] = field(default_factory=dict)  # per layer: g^T u < 0
    realized_layer: dict[str, Rate] = field(default_factory=dict)  # per layer, with --per-layer-p
    psi_val: float | None = None
    # (L_base - L_move) / L_base of each optimizer move (blocked: 0): how much a move descends,
    # beside whether it does (p_t is a sign test: 1e-9 counts like 1)
    descent: list[float] = field(default_factory=list)
    g_b: str = "direct"  # "example shares" when g_b came from per-example shares
    g_b_reason: str | None = None  # why g_b took the direct path (None with shares)


@dataclass
class StateGradients:
    """What p_t needs at a state before any move: the realized losses the moves are
    compared with, the training split's gradient (the surrogate) and, for LoRA, its
    per-example shares. The burst computes these at its first state anyway."""

    base: float
    base_val: float | None
    g_full: dict[str, Tensor]
    shares: ExampleShares | None
    no_shares: str | None = None  # why there are none (the direct path's reason)


def split_gradient(
    step: int, real: Realization, evaluator: LossEvaluator, module: nn.Module | None, train: Batch,
    now: dict[str, Tensor], examples: int, verdict: SharesVerdict | None = None,
) -> tuple[dict[str, Tensor], ExampleShares | None, str | None]:
    """The gradient of the whole training split and, where supported, its per-example
    shares; else the reason there are none. No shares are recorded once `verdict` knows
    the loss couples examples."""
    what = f"at step {step}"
    reason: str | None = None
    if module is None:
        reason = "per-example shares were not requested"
    elif not ExampleShares.supported(module, real):
        reason = ExampleShares.unsupported_reason(module, real) or "per-example shares are not supported here"
    elif verdict is not None and verdict.reason is not None:
        reason = verdict.reason
    if reason is not None:
        return evaluator.loss_and_grad(now, train, what)[1], None, reason
    assert module is not None
    shares = ExampleShares(module, real, examples)
    with shares.recording():
        _, g_full = evaluator.loss_and_grad(now, train, what)
    return (g_full, shares, None) if shares.usable else (g_full, None, FOLDED)


def dict_norm(d: Direction) -> float:
    """Euclidean norm over every tensor: float32 per tensor (pairwise, ~1e-7 relative,
    no float64 copy of a model-sized direction), combined in float64."""
    if not d:
        return 0.0
    first = next(iter(d.values())).device  # a device map spreads the tensors: their norms meet on one device
    per_tensor = torch.stack([torch.linalg.vector_norm(v).to(first) for v in d.values()]).double()
    norm = float(torch.linalg.vector_norm(per_tensor))
    if math.isinf(norm):  # entries beyond ~1e19 overflow float32 squares
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v, dtype=torch.float64).to(first)
                                                           for v in d.values()])))
    return norm


def scaled(d: Direction, factor: float) -> Direction:
    return {k: v * factor for k, v in d.items()}


def normalized(d: Direction) -> Direction:
    n = dict_norm(d)
    return scaled(d, 1.0 / n) if n > 0 else d


def combine(a: Direction, b: Direction, weight: float) -> Direction:
    return {k: a[k] + weight * b[k] for k in a}


def is_blocked(real: Realization, moved: dict[str, Tensor], now: dict[str, Tensor]) -> bool:
    return all(torch.equal(moved[k], now[k]) for k in real.trainable)


def measure_pt(
    *,
    step: int,
    real: Realization,
    evaluator: LossEvaluator,
    train: Batch,
    evaluation: Batch,
    val: Batch | None,
    micro: MicroBatches,
    precondition: Callable[[Direction], Direction],
    radius: float,
    samples: int,
    sigma: float,
    generator: torch.Generator,
    layer_of: dict[str, str],
    early_stop: bool = True,
    per_layer_radius: dict[str, float] | None = None,
    module: nn.Module | None = None,
    known: StateGradients | None = None,
    verdict: SharesVerdict | None = None,
    progress: PtProgress | None = None,
) -> PtAtState:
    """All p_t figures at the current state of `real` (its phi is left unchanged).

    Moves are judged on the fixed `evaluation` batch (and `val`); the surrogate uses
    the gradient of the whole training split `train` (micro-batches are drawn from
    it). `known` passes what the caller already computed at this state; `module`
    (the model evaluator runs) enables per-example shares for LoRA; `verdict`
    remembers, across the states of a burst, a loss found to couple examples.
    """
    out = PtAtState(step=step, radius=radius, val=Rate() if val is not None else None)
    stored = real.stored()
    now = real.realized(stored)
    if known is None:
        base = evaluator.loss(now, evaluation, f"at step {step}")
        base_val = evaluator.loss(now, val, f"on the held-out batch at step {step}") if val is not None else None
        g_full, shares, out.g_b_reason = split_gradient(step, real, evaluator, module, train, now, micro.n, verdict)
    else:
        base, base_val, g_full, shares = known.base, known.base_val, known.g_full, known.shares
        out.g_b_reason = known.no_shares
    if val is not None:
        _, g_val = evaluator.loss_and_grad(now, val, f"on the held-out batch at step {step}")
        captured = sum(float(v.double().square().sum()) for v in real.project(g_val).values())
        total = sum(float(v.double().square().sum()) for v in g_val.values())
        out.psi_val = (captured / total) ** 0.5 if total > 0 else None
    if progress is not None:
        progress("setup", 0, 0, 0)

    checked = False

    def proposal_signal() -> Direction:
        """D g_b for a fresh micro-batch, as a W-space direction (it lies in S)."""
        nonlocal shares, checked
        index = micro.next_index()
        if shares is not None and checked:
            g_phi = shares.micro_batch(index)
        else:
            # only the trained weights' gradient: frozen ones (embeddings) cost a backward for nothing
            _, g_b = evaluator.loss_and_grad(now, take(train, index), f"at step {step}", wrt=real.trainable)
            g_phi = real.phi_grad(g_b)
            if shares is not None:  # first sample: the shares must agree with it
                checked = True
                if shares.agrees_with(index, g_phi):
                    out.g_b = "example shares"
                else:
                    shares = None
                    out.g_b_reason = COUPLED
                    if verdict is not None:
                        verdict.coupled = True
        return real.to_weight_space(precondition(g_phi))

    layers = sorted({layer_of[k] for k in real.trainable})
    out.surrogate = {layer: Rate() for layer in layers}

    def trial(u: Direction, rate: Rate, val_rate: Rate | None, descent: list[float] | None = None) -> bool:
        moved_w = {k: stored[k] + u[k] for k in real.trainable}
        moved = real.realized(moved_w, real.move_rounding)
        if is_blocked(real, moved, now):
            rate.add(False)
            if val_rate is not None:
                val_rate.add(False)
            if descent is not None:
                descent.append(0.0)
            return True
        loss = evaluator.loss(moved, evaluation, f"for a p_t move at step {step}")
        rate.add(loss < base)
        if descent is not None and base > 0:
            descent.append((base - loss) / base)
        if val_rate is not None and val is not None and base_val is not None:
            val_rate.add(evaluator.loss(moved, val, f"for a p_t move at step {step}") < base_val)
        return False

    def done(rate: Rate) -> bool:
        return early_stop and rate.n >= FIRST_CHECK and rate.n % 8 == 0 and excludes_half(rate.successes, rate.n)

    for n in range(1, samples + 1):
        signal = normalized(proposal_signal())
        noise = normalized(real.gaussian(generator)) if sigma > 0 else None
        direction = normalized(combine(signal, noise, sigma)) if noise is not None else signal
        u = scaled(direction, -radius)
        for layer in layers:
            dot = sum(float(torch.dot(g_full[k].reshape(-1), u[k].reshape(-1))) for k in real.trainable if layer_of[k] == layer)
            out.surrogate[layer].add(dot < 0)
        out.blocked += trial(u, out.optimizer, out.val, out.descent)
        if progress is not None:
            progress("optimizer", n, 0, 0)
        if done(out.optimizer):
            break
    for n in range(1, samples + 1):
        u = scaled(normalized(real.gaussian(generator)), radius)
        out.blocked_uniform += trial(u, out.uniform, None)
        if progress is not None:
            progress("uniform", n, 0, 0)
        if done(out.uniform):
            break
    if per_layer_radius is not None:
        for li, layer in enumerate(layers):
            keys = [k for k in real.trainable if layer_of[k] == layer]
            rate = Rate()
            r_l = per_layer_radius.get(layer, 0.0)
            for n in range(1, samples + 1):
                full_signal = proposal_signal()
                sig = {k: full_signal[k] for k in keys}
                noise = real.gaussian(generator)
                d = normalized(sig)
                if sigma > 0:
                    d = normalized(combine(d, normalized({k: noise[k] for k in keys}), sigma))
                u = {k: torch.zeros_like(stored[k]) for k in real.trainable}
                u.update(scaled(d, -r_l))
                trial(u, rate, None)
                if progress is not None:
                    progress("layer", n, li, len(layers))
                if done(rate):
                    break
            out.realized_layer[layer] = rate
    return out
