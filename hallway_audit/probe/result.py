"""What one probe burst measured: per-step records, per-layer tallies, summaries.

Summaries follow docs/definitions.md §5.7: means over the burst's steps (and the minimum for beta);
p_t pools the samples of every measured state, with its Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .crossing import HIST_LABELS
from .horizon import RunForecast, Schedule
from .pt import PtAtState, Rate
from .settings import Setting


def relative_drop(initial: float, losses: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(L0 - L_K) / L0 over a burst, with a 95% interval from the least-squares line
    through L0..L_K (the drop is K times its slope; the interval is the slope's, from
    the residuals, and needs K >= 2)."""
    if not losses or not initial > 0 or not all(math.isfinite(x) for x in (initial, *losses)):
        return None, None, None
    drop = (initial - losses[-1]) / initial
    ys = [initial, *losses]
    n = len(ys)
    if n < 4:
        return drop, None, None
    xs = list(range(n))
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, ys, strict=True)]
    se = math.sqrt(sum(r * r for r in resid) / (n - 2) / sxx)
    half = 1.96 * se * (n - 1) / initial
    return drop, drop - half, drop + half


#: The compounded forecast is trusted down to this fraction of the loss the burst ends at
#: (docs/definitions.md §4.8). Past it the run is predicted to exhaust what the loss can
#: give, and a larger horizon (LoRA's acceleration estimate) would outrank a deeper
#: measured drop on extrapolation alone; calibrated on the validation suite, where any
#: value in 0.001-0.02 gives the same ranks (README "Does it predict?").
EXTRAPOLATION_FLOOR = 0.01


def score(progress: float | None, master: float | None, forecast: RunForecast | None, horizon: float) -> float | None:
    """The predicted relative loss drop over the planned run (docs/definitions.md §4.8).

    The burst's relative drop p over K steps (or, where the forward rounds fp32 master
    weights, the drop at the master weights times beta_run: what the master drift turns
    into once it crosses cells) is compounded over the run: 1 - (1 - p) ** horizon, where
    horizon is the number of bursts the run is worth (horizon.effective_horizon: its lr
    budget, less what nearest rounding eats at decayed lrs, LoRA going on at its end-of-burst
    rate; with horizon.growth_horizon, LoRA's growth carried through the run: score_growth).
    The remaining loss is never predicted below EXTRAPOLATION_FLOOR of what the burst left,
    so settings that all exhaust the loss rank by how far their burst got. A rising loss
    (p <= 0) is returned as is. It ranks settings, not a forecast of the final loss: real
    training saturates."""
    if progress is None:
        return None
    potential = progress
    if master is not None and forecast is not None:
        potential = max(progress, master * forecast.beta_run)
    if potential <= 0:
        return potential
    left = 1.0 - min(potential, 0.999)
    return 1.0 - max(left**horizon, EXTRAPOLATION_FLOOR * left)


def _descent(drops: Sequence[float]) -> dict[str, float | None]:
    """p_t_descent: the mean relative loss drop of p_t's optimizer moves, with a 95% normal
    interval (1.96 standard errors; needs 2 moves)."""
    if not drops:
        return {"p_t_descent": None, "p_t_descent_lo": None, "p_t_descent_hi": None}
    n = len(drops)
    mean = sum(drops) / n
    if n < 2:
        return {"p_t_descent": mean, "p_t_descent_lo": None, "p_t_descent_hi": None}
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in drops) / (n - 1) / n)
    return {"p_t_descent": mean, "p_t_descent_lo": mean - half, "p_t_descent_hi": mean + half}


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


@dataclass
class LayerDynamics:
    name: str
    trainable: bool
    psi: list[float | None] = field(default_factory=list)  # per step
    beta: list[float | None] = field(default_factory=list)
    beta_proposed: list[float | None] = field(default_factory=list)
    beta_adapter: list[float | None] = field(default_factory=list)
    beta_eff_elem: list[float | None] = field(default_factory=list)
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(len(HIST_LABELS), dtype=torch.int64))
    # Entries of hist whose proposed step was exactly zero: values no gradient has reached
    # (embedding rows of tokens the batch never uses). The histogram keeps them, as the
    # paper's does; the run forecast leaves them out (moving_hist).
    idle: int = 0
    psi_rank: float | None = None
    psi_star: dict[int, float] = field(default_factory=dict)
    r_star: int | None = None
    matrix_rank: int | None = None
    planned_rank: int | None = None
    update_norms: list[float] = field(default_factory=list)
    # Any nonzero gradient in the split's gradient at the start or a step's micro-batch
    # gradient. A layer the loss never reaches (BERT's pooler under a mean-pooling loss)
    # cannot move whatever the format: its crossings say nothing about the plan.
    grad_seen: bool = False
    grad_share: float | None = None  # share of the squared gradient over what the setting trains
    forecast: RunForecast | None = None  # over the planned run (horizon.py)
    fan_in_fan_out: bool = False  # a Conv1D (weight stored (in, out)): PEFT's LoraConfig needs fan_in_fan_out

    def moving_hist(self) -> torch.Tensor:
        """hist without its idle entries: the steps the optimizer asked of the values."""
        out = self.hist.clone()
        out[0] = max(0, int(out[0]) - self.idle)
        return out

    @property
    def no_grad(self) -> bool:
        """Exactly zero gradient under this loss, everywhere it was measured."""
        return not self.grad_seen

    def metrics(self, surrogate: Rate | None, realized: Rate | None) -> dict[str, object]:
        total = int(self.hist.sum())
        above = int(self.hist[HIST_LABELS.index("1/2-1"):].sum())
        betas = [b for b in self.beta if b is not None]
        moves = self.trainable and self.grad_seen  # crossings are measured only where a gradient is
        out: dict[str, object] = {
            "no_grad": self.no_grad,
            "psi": _mean(self.psi),
            "psi_rank": self.psi_rank,
            "psi_star": {str(k): v for k, v in self.psi_star.items()} if self.grad_seen else {},
            "r_star": self.r_star,
            "beta": _mean(self.beta) if moves else None,
            "beta_min": min(betas) if betas and moves else None,
            "beta_proposed": _mean(self.beta_proposed) if moves else None,
            "beta_adapter": _mean(self.beta_adapter) if self.grad_seen else None,
            "beta_eff_elem": _mean(self.beta_eff_elem),
            "ulp_hist": {label: _ratio(int(c), total) for label, c in zip(HIST_LABELS, self.hist.tolist(), strict=True)} if total else None,
            "ulp_mass_above_half": _ratio(above, total) if moves else None,
            "p_t_surrogate": surrogate.p if surrogate and self.grad_seen else None,
            "grad_share": self.grad_share,
            "beta_run": self.forecast.beta_run if self.forecast and moves else None,
            "run_moving": self.forecast.run_moving if self.forecast and moves else None,
            "run_realized": self.forecast.run_realized if self.forecast and moves else None,
            "stall_step": self.forecast.stall_step if self.forecast and moves else None,  # None: moves to the end
        }
        if realized is not None:
            lo, hi = realized.interval
            out.update({"p_t_layer": realized.p, "p_t_layer_lo": lo, "p_t_layer_hi": hi})
        return out


@dataclass
class StepRecord:
    step: int
    loss: float  # realized train loss after the step
    val_loss: float | None
    micro_loss: float  # the micro-batch loss the step was taken on (before it)
    psi: float | None
    beta: float | None
    beta_proposed: float | None
    beta_eff: float | None
    beta_eff_elem: float | None
    update_norm: float


@dataclass
class SettingResult:
    setting: Setting
    loss_name: str
    tokens: int  # tokens (or examples) the psi_star/r_star gradient rests on
    initial_loss: float
    initial_val_loss: float | None
    steps: list[StepRecord]
    layers: dict[str, LayerDynamics]
    pt: list[PtAtState]
    psi_rank: float | None
    seconds: float
    forwards: int
    backwards: int
    schedule: Schedule = field(default_factory=Schedule)
    forecast: RunForecast | None = None  # gradient-weighted over the layers
    stall_lr: float | None = None  # the lr at the forecast's stall step
    shadow: tuple[float, float] | None = None  # loss at the master weights, start and end
    horizon: float = 0.0  # bursts the planned run is worth (horizon.effective_horizon)
    horizon_growth: float = 0.0  # the same with LoRA's growth carried through the run (horizon.growth_horizon)
    kappa: float = 0.0  # LoRA's growth of the per-step drop (horizon.lora_kappa); 0 for other settings
    accel: float = 1.0  # LoRA's end-of-burst rate over its mean (horizon.lora_acceleration); 1 for others

    @property
    def id(self) -> str:
        return self.setting.id

    def _pooled(self, attr: str) -> Rate:
        total = Rate()
        for state in self.pt:
            r = getattr(state, attr)
            if r is not None:
                total += r
        return total

    def model_metrics(self) -> dict[str, float | int | None]:
        opt, uni, val = self._pooled("optimizer"), self._pooled("uniform"), self._pooled("val")
        lo, hi = opt.interval
        ulo, uhi = uni.interval
        blocked = sum(s.blocked for s in self.pt)
        betas = [s.beta for s in self.steps if s.beta is not None]
        final = self.steps[-1] if self.steps else None
        return {
            "psi": _mean([s.psi for s in self.steps]),
            "psi_rank": self.psi_rank,
            "psi_val": _mean([s.psi_val for s in self.pt]),
            "p_t": opt.p,
            "p_t_lo": lo,
            "p_t_hi": hi,
            "p_t_samples": opt.n,
            "p_t_uniform": uni.p,
            "p_t_uniform_lo": ulo,
            "p_t_uniform_hi": uhi,
            "p_t_val": val.p,
            **_descent([d for state in self.pt for d in state.descent]),
            "blocked": _ratio(blocked, opt.n),
            "beta": _mean(betas),
            "beta_min": min(betas) if betas else None,
            "beta_proposed": _mean([s.beta_proposed for s in self.steps]),
            "beta_eff": _mean([s.beta_eff for s in self.steps]),
            "beta_eff_elem": _mean([s.beta_eff_elem for s in self.steps]),
            "loss": final.loss if final else self.initial_loss,
            "val_loss": final.val_loss if final else self.initial_val_loss,
            "loss_delta": (final.loss - self.initial_loss) if final else 0.0,
            **self.outlook(),
        }


    def outlook(self) -> dict[str, float | int | None]:
        """Progress over the burst and the forecast over the planned run (docs/definitions.md §4.7, §4.8)."""
        progress, lo, hi = relative_drop(self.initial_loss, [s.loss for s in self.steps])
        val_losses = [s.val_loss for s in self.steps]
        progress_val = None
        if self.initial_val_loss is not None and val_losses and all(v is not None for v in val_losses):
            progress_val = relative_drop(self.initial_val_loss, [float(v) for v in val_losses if v is not None])[0]
        shadow = (self.shadow[0] - self.shadow[1]) / self.shadow[0] if self.shadow and self.shadow[0] > 0 else None
        f = self.forecast
        lora = self.setting.subspace.kind == "lora"
        return {
            "progress": progress,
            "progress_lo": lo,
            "progress_hi": hi,
            "progress_val": progress_val,
            "progress_master": shadow,
            "beta_run": f.beta_run if f else None,
            "run_moving": f.run_moving if f else None,
            "run_realized": f.run_realized if f else None,
            "horizon": self.horizon,
            "horizon_growth": self.horizon_growth,
            "lora_kappa": self.kappa if lora else None,
            "lora_accel": self.accel if lora else None,
            "stall_step": (f.stall_step if f.stall_step is not None else self.schedule.steps) if f else None,
            "stall_lr": self.stall_lr,
            "train_steps": self.schedule.steps,
            "score": score(progress, shadow, f, self.horizon),
            "score_growth": score(progress, shadow, f, self.horizon_growth),
        }

    def layer_metrics(self) -> dict[str, dict[str, object]]:
        surrogate: dict[str, Rate] = {}
        realized: dict[str, Rate] = {}
        for state in self.pt:
            for layer, r in state.surrogate.items():
                surrogate.setdefault(layer, Rate())
                surrogate[layer] += r
            for layer, r in state.realized_layer.items():
                realized.setdefault(layer, Rate())
                realized[layer] += r
        return {name: d.metrics(surrogate.get(name), realized.get(name)) for name, d in self.layers.items()}
