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

Moves are drawn one by one but may be judged several per forward (pt_batch.py: on
CUDA by default): a chunk of moves never crosses an early-stopping check, so the
same samples are drawn, in the same order, and the same decisions are taken.

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
from .pt_batch import moves_per_forward
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
    moves_per_forward: int = 1  # how many moves one forward judged (pt_batch.py)
    batch_note: str | None = None  # why batching was asked for but the loop ran (vmap failed)


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


def chunk_end(drawn: int, samples: int, size: int, early_stop: bool) -> int:
    """The last sample of the next chunk after `drawn`: at most `size` samples, never past an
    early-stopping check (FIRST_CHECK, then every 8), so a chunk draws nothing the loop would not."""
    end = min(samples, drawn + max(size, 1))
    if early_stop:
        end = min(end, max(FIRST_CHECK, (drawn // 8 + 1) * 8))
    return end


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

    size = moves_per_forward(now, real.trainable)
    out.moves_per_forward = size
    what = f"for a p_t move at step {step}"

    def realize(u: Direction) -> dict[str, Tensor] | None:
        """The realized weights after move u (drawn now: stochastic rounding keeps the loop's order); None if blocked."""
        moved_w = {k: stored[k] + u[k] for k in real.trainable}
        moved = real.realized(moved_w, real.move_rounding)
        return None if is_blocked(real, moved, now) else moved

    def losses(live: list[dict[str, Tensor]], batch: Batch, base_loss: float) -> tuple[float, list[float | None]]:
        """(the loss the moves are compared with, each move's loss; None: not computed): one vmapped
        forward when batching, the state's own loss riding along so that each comparison is between
        two forwards summed alike; else the loop's forwards (evaluated lazily, in order, by judge)."""
        if size > 1 and len(live) > 1:
            trained = [{k: m[k] for k in real.trainable} for m in live]
            values = evaluator.stacked_losses([{k: now[k] for k in real.trainable}, *trained], now, batch)
            if values is not None:
                evaluator.forwards += len(live)
                return evaluator.checked(values[0], f"at step {step}"), list(values[1:])
            out.batch_note = evaluator.unbatchable
            out.moves_per_forward = 1
        return base_loss, [None] * len(live)

    def judge(moves: list[dict[str, Tensor] | None], rate: Rate, val_rate: Rate | None,
              descent: list[float] | None = None) -> int:
        """Record each move's outcome, in order; returns how many were blocked."""
        live = [m for m in moves if m is not None]
        with_val = val_rate is not None and val is not None and base_val is not None
        b, evals = losses(live, evaluation, base)
        b_val, vals = losses(live, val, base_val) if with_val and val is not None and base_val is not None else (0.0, [])
        blocked = 0
        i = 0
        for m in moves:
            if m is None:
                blocked += 1
                rate.add(False)
                if val_rate is not None:
                    val_rate.add(False)
                if descent is not None:
                    descent.append(0.0)
                continue
            e = evals[i]
            loss = evaluator.loss(m, evaluation, what) if e is None else evaluator.checked(e, what)
            rate.add(loss < b)
            if descent is not None and b > 0:
                descent.append((b - loss) / b)
            if with_val and val_rate is not None and val is not None:
                v = vals[i]
                val_rate.add((evaluator.loss(m, val, what) if v is None else evaluator.checked(v, what)) < b_val)
            i += 1
        return blocked

    def done(rate: Rate) -> bool:
        return early_stop and rate.n >= FIRST_CHECK and rate.n % 8 == 0 and excludes_half(rate.successes, rate.n)

    def run(draw: Callable[[], Direction], rate: Rate, val_rate: Rate | None, descent: list[float] | None,
            report: Callable[[int], None]) -> int:
        """Up to `samples` moves from draw(), judged a chunk at a time; returns how many were blocked."""
        blocked = 0
        drawn = 0
        while drawn < samples:
            end = chunk_end(drawn, samples, size, early_stop)
            moves = [realize(draw()) for _ in range(drawn, end)]
            blocked += judge(moves, rate, val_rate, descent)
            for n in range(drawn + 1, end + 1):
                report(n)
            drawn = end
            if done(rate):
                break
        return blocked

    def optimizer_move() -> Direction:
        signal = normalized(proposal_signal())
        noise = normalized(real.gaussian(generator)) if sigma > 0 else None
        direction = normalized(combine(signal, noise, sigma)) if noise is not None else signal
        u = scaled(direction, -radius)
        for layer in layers:
            dot = sum(float(torch.dot(g_full[k].reshape(-1), u[k].reshape(-1))) for k in real.trainable if layer_of[k] == layer)
            out.surrogate[layer].add(dot < 0)
        return u

    def reporter(part: Part, li: int = 0, n_layers: int = 0) -> Callable[[int], None]:
        def report(n: int) -> None:
            if progress is not None:
                progress(part, n, li, n_layers)
        return report

    out.blocked = run(optimizer_move, out.optimizer, out.val, out.descent, reporter("optimizer"))
    out.blocked_uniform = run(lambda: scaled(normalized(real.gaussian(generator)), radius), out.uniform, None, None,
                              reporter("uniform"))
    if per_layer_radius is not None:
        for li, layer in enumerate(layers):
            keys = [k for k in real.trainable if layer_of[k] == layer]
            rate = Rate()
            r_l = per_layer_radius.get(layer, 0.0)

            def layer_move(keys: list[str] = keys, r_l: float = r_l) -> Direction:
                full_signal = proposal_signal()
                sig = {k: full_signal[k] for k in keys}
                noise = real.gaussian(generator)
                d = normalized(sig)
                if sigma > 0:
                    d = normalized(combine(d, normalized({k: noise[k] for k in keys}), sigma))
                u = {k: torch.zeros_like(stored[k]) for k in real.trainable}
                u.update(scaled(d, -r_l))
                return u

            run(layer_move, rate, None, None, reporter("layer", li, len(layers)))
            out.realized_layer[layer] = rate
    return out
