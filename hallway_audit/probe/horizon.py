"""From a burst of K steps to the planned run: which weights will have moved by its end.

A burst measures per-step crossings at the peak learning rate. Whether a setting
trains is a question about the whole run (docs/definitions.md §4.7):

* with fp32 master weights, sub-ULP steps accumulate: a weight changes cell once its
  accumulated drift leaves the cell, however small each step is;
* with stochastic rounding (no master weights), a step of |delta| < ULP moves the
  stored weight one cell with probability |delta| / ULP: in expectation it drifts
  like a master weight;
* with nearest rounding and no master weights, a step smaller than half a ULP
  rounds back: a weight moves only at the steps whose proposal is big enough, and an
  lr schedule that decays the lr can stall training part-way.

Adam's step is lr * m / (sqrt(v) + eps): its size scales with lr, so the burst's
histogram of |delta| / ULP at the peak lr predicts the per-step crossing rate at any
other lr of the schedule by shifting it (beta_at_scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from ..lattice import Format
from .crossing import HIST_EDGES

if TYPE_CHECKING:
    from .realize import Realization

ScheduleKind = Literal["constant", "cosine", "linear"]
Scales = Sequence[float] | np.ndarray  # lr(t) / peak along the run (Schedule.factor_array)


@dataclass(frozen=True)
class Schedule:
    """The planned run: `steps` optimizer steps, `warmup` of them rising linearly to the
    peak lr, then constant or decaying (cosine / linear) to `lr_min` (absolute)."""

    kind: ScheduleKind = "constant"
    steps: int = 1000
    warmup: int = 0
    lr_min: float = 0.0

    def factor_array(self, peak: float) -> np.ndarray:
        """lr(t) / peak for t = 0 .. steps-1 (the peak is the setting's lr), vectorized:
        a run can be millions of steps and every forecast walks all of them."""
        floor = min(self.lr_min / peak, 1.0) if peak > 0 else 0.0
        t = np.arange(self.steps, dtype=np.float64)
        progress = (t - self.warmup) / max(self.steps - self.warmup, 1)
        if self.kind == "cosine":
            out = floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * progress))
        elif self.kind == "linear":
            out = floor + (1.0 - floor) * (1.0 - progress)
        else:
            out = np.ones(self.steps)
        if self.warmup:
            out[: self.warmup] = (t[: self.warmup] + 1) / self.warmup
        return out

    def factors(self, peak: float) -> list[float]:
        return self.factor_array(peak).tolist()

    @property
    def label(self) -> str:
        parts = [self.kind, f"{self.steps} steps"]
        if self.warmup:
            parts.append(f"warmup {self.warmup}")
        if self.kind != "constant":
            parts.append(f"to lr {self.lr_min:g}")
        return ", ".join(parts)


# The histogram's bins as ratio ranges; the open ends are closed one octave out.
_LOWS = (HIST_EDGES[0] / 2, *HIST_EDGES)
_HIGHS = (*HIST_EDGES, HIST_EDGES[-1] * 2)


def beta_at_scales(hist: Sequence[float], scales: np.ndarray) -> np.ndarray:
    """beta_at_scale for every scale at once (same arithmetic, one pass per bin)."""
    total = float(sum(hist))
    out = np.zeros(len(scales))
    if total <= 0:
        return out
    with np.errstate(divide="ignore"):
        threshold = 0.5 / np.asarray(scales, dtype=np.float64)  # inf where scale is 0
    for count, lo, hi in zip(hist, _LOWS, _HIGHS, strict=True):
        if count:
            out += count * np.clip(np.log2(hi / threshold) / math.log2(hi / lo), 0.0, 1.0)
    return out / total


def beta_at_scale(hist: Sequence[float], scale: float) -> float:
    """Fraction of steps larger than half a ULP when every step is `scale` times the
    histogram's (|delta| / ULP counts in crossing.HIST_LABELS bins); log-uniform
    within a bin."""
    total = float(sum(hist))
    if total <= 0 or scale <= 0:
        return 0.0
    threshold = 0.5 / scale  # ratio * scale > 1/2
    above = 0.0
    for count, lo, hi in zip(hist, _LOWS, _HIGHS, strict=True):
        if lo >= threshold:
            above += count
        elif hi > threshold:
            above += count * math.log2(hi / threshold) / math.log2(hi / lo)
    return above / total


def sr_moved_at_least_once(hist: Sequence[float], scales: Scales) -> float:
    """Fraction of weights stochastic rounding moves at least once in a run whose step
    t is scales[t] times the histogram's: a step of r ULP moves the stored weight
    with probability min(1, r), independently per step."""
    total = float(sum(hist))
    if total <= 0:
        return 0.0
    moved = 0.0
    s = np.asarray(scales, dtype=np.float64)
    for count, lo, hi in zip(hist, _LOWS, _HIGHS, strict=True):
        if not count:
            continue
        p = np.minimum(1.0, math.sqrt(lo * hi) * s)
        log_stay = -math.inf if bool((p >= 1.0).any()) else float(np.log1p(-p).sum())
        moved += count * (1.0 - math.exp(log_stay))
    return moved / total


@torch.no_grad()
def master_cells_changed(fmt: Format, start: Tensor, end: Tensor, gain: float, where: Tensor | None = None) -> int:
    """Weights whose cell changes once the burst's drift (end - start) is carried on
    `gain` times further in fp32 master weights: cell(start + gain * drift) != cell(start),
    on the lattice fixed at `start`; counted only `where` given."""
    lattice = fmt.at(start)
    reached = start + (end - start) * gain
    differ = lattice.cells_differ(start, reached)
    return int(torch.count_nonzero(differ if where is None else differ & where))


@dataclass
class RunForecast:
    """A layer's forecast over the planned run."""

    beta_run: float  # fraction of its weights that change cell at least once in the run
    run_moving: float  # fraction of the run's steps at which more than beta_floor of them cross
    stall_step: int | None  # the first step from which it no longer moves (None: it moves to the end)
    # the run's lr budget the lattice turns into movement, relative to the peak's (1: all of it)
    run_realized: float = 1.0


# A step whose realized update is less than this fraction of what the same step realizes at
# the peak lr (relative to its size) counts as stalled: from there on, rounding eats most of it.
STALL_EFFICIENCY = 0.5


def rounding_efficiency(hist: Sequence[float], scales: Scales) -> np.ndarray:
    """eta(s): the mean over weights of the fraction of its intended step that nearest
    rounding realizes, when every step is s times the histogram's (|delta| / ULP,
    log-uniform within a bin): E[round(r s) / (r s)], round(x) = floor(x + 1/2) ULPs.

    Adam's steps are about lr in size whatever the weight's magnitude, so each weight's
    intended step counts alike: a small weight with a fine ULP (large r) moves, a large
    one (r < 1/2) realizes nothing. Per bin, with x = r s on [a, b):
    E[floor(x + 1/2) / x] = sum_k (1 / max(a, k - 1/2) - 1 / b)^+ / ln(b / a), exact."""
    s = np.asarray(scales, dtype=np.float64)
    total = float(sum(hist))
    out = np.zeros(len(s))
    positive = s > 0
    if total <= 0 or not positive.any():
        return out
    values = np.zeros(int(positive.sum()))
    for count, lo, hi in zip(hist, _LOWS, _HIGHS, strict=True):
        if not count:
            continue
        a, b = lo * s[positive], hi * s[positive]
        top = math.ceil(float(b.max()) + 0.5)
        halves = np.arange(1, top + 1, dtype=np.float64) - 0.5  # k - 1/2 for k = 1 .. top
        terms = 1.0 / np.maximum(a[:, None], halves[None, :]) - 1.0 / b[:, None]
        values += count * np.clip(terms, 0.0, None).sum(axis=1) / math.log(hi / lo)
    out[positive] = values / total
    return out


def relative_efficiency(hist: Sequence[float], scales: Scales) -> np.ndarray | None:
    """eta(s_t) / eta(1) along the run: what nearest rounding realizes of each step,
    relative to what it realizes at the peak lr. None when nothing moves at the peak."""
    f = np.asarray(scales, dtype=np.float64)
    eta = rounding_efficiency(hist, np.concatenate([[1.0], f]))
    return eta[1:] / eta[0] if eta[0] > 0 else None


def realized_and_stall(relative: np.ndarray | None, scales: Scales) -> tuple[float, int | None]:
    """The run's lr budget realized relative to the peak's efficiency, and the stall step:
    the step after which every step realizes less than STALL_EFFICIENCY of what it would
    at the peak (None: it moves to the end; 0 with relative None: it never moves)."""
    f = np.asarray(scales, dtype=np.float64)
    if relative is None:
        return 0.0, 0
    budget = float(f.sum())
    realized = float((f * relative).sum() / budget) if budget > 0 else 0.0
    working = np.flatnonzero(relative >= STALL_EFFICIENCY)
    last = int(working[-1]) if len(working) else -1
    stall = 0 if last < 0 else (last + 1 if last + 1 < len(f) else None)
    return min(realized, 1.0), stall


def forecast_by_steps(hist: Sequence[float], scales: Scales, floor: float) -> RunForecast:
    """Nearest rounding, no master weights: a weight moves only at steps whose proposal
    exceeds half a ULP, so each step's crossing rate is the shifted histogram; the run
    stalls from the step after which every step realizes less than STALL_EFFICIENCY of
    what it would at the peak lr's efficiency."""
    return _forecast_by_steps(hist, scales, floor, relative_efficiency(hist, scales))


def _forecast_by_steps(hist: Sequence[float], scales: Scales, floor: float, relative: np.ndarray | None) -> RunForecast:
    """forecast_by_steps with the layer's relative_efficiency already computed (the model's
    forecast reuses it)."""
    f = np.asarray(scales, dtype=np.float64)
    rates = beta_at_scales(hist, f)
    if not len(rates):
        return RunForecast(0.0, 0.0, 0, 0.0)
    realized, stall = realized_and_stall(relative, f)
    return RunForecast(float(rates.max()), float((rates > floor).mean()), stall, realized)


@torch.no_grad()
def lora_kappa(g_full: dict[str, Tensor], lora: dict[str, tuple[float, int]], start_phi: dict[str, Tensor],
               end_phi: dict[str, Tensor], burst_steps: int) -> float:
    """LoRA's loss drop grows with time: W = W0 + s B A starts at B = 0, and once both
    factors move the change s (B0 + t dB)(A0 + t dA) has a t^2 term. To first order the
    drop after t steps is a t + b t^2 with a = -s <G, dB A0 + B0 dA>, b = -s <G, dB dA>
    (G the gradient at the start, dA, dB the burst's mean step); returns kappa = b / a
    summed over the adapted layers (0 when the burst shows no such growth)."""
    a = b = 0.0
    k = max(burst_steps, 1)
    for name, (scale, _) in lora.items():
        g = g_full.get(name)
        keys = (name + "::A", name + "::B")
        if g is None or any(key not in start_phi or key not in end_phi for key in keys):
            continue
        gd = g.double()
        a0, b0 = (start_phi[key].to(gd.device, torch.float64) for key in keys)
        da = (end_phi[keys[0]].to(gd.device, torch.float64) - a0) / k
        db = (end_phi[keys[1]].to(gd.device, torch.float64) - b0) / k
        a += -scale * float((gd * (db @ a0 + b0 @ da)).sum())
        b += -scale * float((gd * (db @ da)).sum())
    return b / a if a > 0 and b > 0 else 0.0


def lora_acceleration(initial: float, losses: Sequence[float]) -> float:
    """How much faster a LoRA burst lowers the loss at its end than on average: the slope of
    -log(L_t / L0) over the burst's second half over its mean slope -log(L_K / L0) / K, at
    least 1. Adapters start at B = 0 and their descent speeds up as both factors grow, so the
    run goes on from the rate the burst ends at, not from its mean; 1 when the burst is too
    short (under 8 steps) or the loss did not drop."""
    k = len(losses)
    if k < 8 or not initial > 0 or not all(math.isfinite(x) and x > 0 for x in losses):
        return 1.0
    gains = -np.log(np.asarray(losses, dtype=np.float64) / initial)
    mean = gains[-1] / k
    if not mean > 0:
        return 1.0
    t = np.arange(k // 2, k, dtype=np.float64) + 1.0
    slope = float(np.polyfit(t, gains[k // 2 :], 1)[0])
    return max(1.0, slope / mean)


def effective_horizon(scales: Scales, burst_steps: int, realized: float = 1.0, accel: float = 1.0) -> float:
    """How many bursts' worth of loss drop the run is: tau = (sum of the run's lr, times the
    fraction the lattice realizes) / peak lr, in peak-lr steps; past the burst's K steps the
    drop goes on at `accel` times the burst's mean rate (LoRA: lora_acceleration), so the
    run is worth (K + accel (tau - K)) / K bursts (tau / K when the run is shorter)."""
    k = float(burst_steps)
    if k <= 0:
        return 0.0
    tau = float(np.sum(scales)) * realized
    return tau / k if tau <= k else (k + accel * (tau - k)) / k


def growth_horizon(scales: Scales, burst_steps: int, realized: float = 1.0, kappa: float = 0.0) -> float:
    """The horizon if LoRA's growth went on all run: the drop grows as tau + kappa tau^2
    (kappa: lora_kappa), the burst's as K + kappa K^2. An upper bound (real adapters stop
    speeding up once the loss they can reach nears its floor) that the gate's floor uses, so
    a take-off later than the burst can see is not rejected."""
    k = float(burst_steps)
    if k <= 0:
        return 0.0
    tau = float(np.sum(scales)) * realized
    return (tau + kappa * tau * tau) / (k + kappa * k * k)


def burst_gain(scales: Scales, burst_steps: int) -> float:
    """How much further the run carries the burst's drift: sum of lr over the run
    divided by the burst's (K steps at the peak)."""
    return float(np.sum(scales)) / burst_steps if burst_steps else 0.0


@torch.no_grad()
def forecast_layers(
    real: Realization,
    start_stored: dict[str, Tensor],
    start_phi: dict[str, Tensor],
    hists: dict[str, Tensor],
    layer_of: dict[str, str],
    scales: Scales,
    burst_steps: int,
    floor: float,
) -> tuple[dict[str, RunForecast], dict[str, np.ndarray | None]]:
    """Each trainable layer's RunForecast (hists: the burst's |delta|/ULP counts per layer),
    and for the layers stored on a lattice under nearest rounding without master weights
    their relative_efficiency along the run (None: they do not move at the peak).

    Values that accumulate (fp32 master weights, values stored in fp32 such as PEFT's
    adapters) are forecast per weight from their drift over the burst; stored values
    under stochastic rounding from the per-step move probabilities; under nearest
    rounding from the per-step crossing rate along the schedule.
    """
    end_stored = real.stored()
    gain = burst_gain(scales, burst_steps)
    drift: dict[str, list[int]] = {}  # layer -> [changed, count] of accumulating values
    stepped: set[str] = set()  # layers with values stored on a lattice without master weights
    for name in real.trainable:
        layer = layer_of[name]
        fmt = real.weight_format(name)
        values = (
            [(fmt, start_stored[name], end_stored[name])]
            if fmt is not None
            else [(real.phi_format(k), start_phi[k], real.phi[k].detach()) for k in (name + "::A", name + "::B")]
        )
        for f, v0, v1 in values:
            if f.name == "fp32" or real.master == "fp32":
                # over the values the burst moved: an embedding row no example uses gets no
                # gradient, and counting it would call the table stuck in any format
                touched = v1 != v0
                c = drift.setdefault(layer, [0, 0])
                c[0] += master_cells_changed(f, v0, v1, gain, touched)
                c[1] += int(torch.count_nonzero(touched))
            else:
                stepped.add(layer)
    out: dict[str, RunForecast] = {}
    relative: dict[str, np.ndarray | None] = {}
    for layer in dict.fromkeys(layer_of[n] for n in real.trainable):  # in model order: sums over layers come out the same in every process
        hist = [float(x) / max(burst_steps, 1) for x in hists[layer].tolist()]
        if layer in stepped and real.rounding == "nearest":
            relative[layer] = relative_efficiency(hist, scales)
            out[layer] = _forecast_by_steps(hist, scales, floor, relative[layer])
        elif layer in stepped:
            moved = sr_moved_at_least_once(hist, scales)
            out[layer] = RunForecast(moved, 1.0 if moved > floor else 0.0, None if moved > floor else 0)
        else:
            changed, count = drift.get(layer, (0, 0))
            frac = changed / count if count else 0.0
            out[layer] = RunForecast(frac, 1.0 if frac > floor else 0.0, None if frac > floor else 0)
    return out, relative


def weighted_forecast(
    forecasts: dict[str, RunForecast], shares: dict[str, float], hists: dict[str, Tensor],
    scales: Scales, burst_steps: int, floor: float, stepwise: bool, relative: dict[str, np.ndarray | None],
) -> RunForecast | None:
    """The model's forecast with layers weighted by their share of the gradient: a setting
    trains when the weights that carry the gradient can move, whatever a small norm does.

    Under nearest rounding without master weights (stepwise), the run's realized budget
    and stall step weight each layer's relative efficiency (`relative`, from
    forecast_layers) by its gradient share: the run stalls when the layers that carry the
    gradient stop realizing their steps, even while small fp32 parameters beside them
    (norms, embeddings and head under a coarse format's scope) go on. Layers absent from
    `relative` accumulate their steps (efficiency 1); layers that do not move at the peak
    are left out: the burst's drop holds nothing of them, and nothing changes later."""
    weight = {layer: shares.get(layer, 0.0) for layer in forecasts}
    total = sum(weight.values())
    if total <= 0:
        return None
    beta_run = sum(weight[layer] * f.beta_run for layer, f in forecasts.items()) / total
    if not stepwise:
        moving = sum(weight[layer] * f.run_moving for layer, f in forecasts.items()) / total
        return RunForecast(beta_run, moving, None if moving > 0 else 0)
    mixed = [0.0] * len(next(iter(hists.values())))
    for layer in forecasts:
        counts = hists[layer].tolist()
        n = float(sum(counts))
        if n > 0 and weight[layer] > 0:
            for i, c in enumerate(counts):
                mixed[i] += weight[layer] / total * c / n
    f = np.asarray(scales, dtype=np.float64)
    moving = float((beta_at_scales(mixed, f) > floor).mean()) if len(f) else 0.0
    efficiency = np.zeros(len(f))
    counted = 0.0
    for layer in forecasts:
        if weight[layer] <= 0 or (layer in relative and relative[layer] is None):
            continue
        rel = relative.get(layer)
        efficiency += weight[layer] * (rel if rel is not None else 1.0)
        counted += weight[layer]
    realized, stall = realized_and_stall(efficiency / counted if counted > 0 else None, f)
    return RunForecast(beta_run, moving, stall, realized)
