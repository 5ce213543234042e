"""The registry of metric names that reports carry and rule expressions may use.

Rule files are validated against this table at load time, so a typo in a `when`
expression is an error before any tensor is read, and a rule whose metrics a run
did not measure is reported as skipped rather than passed. Adding a metric is one
entry here plus the code that measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["layer", "model", "setting"]
Phase = Literal["static", "dynamic"]


@dataclass(frozen=True)
class Metric:
    name: str
    scopes: tuple[Scope, ...]
    phase: Phase
    description: str
    # True when the value depends on the setting (format, rank, lr...): a layer rule
    # using only setting-independent metrics is evaluated once per layer, not once
    # per setting, so a NaN weight is reported once rather than once per format.
    per_setting: bool = True


_L: tuple[Scope, ...] = ("layer",)
_LM: tuple[Scope, ...] = ("layer", "model")
_M: tuple[Scope, ...] = ("model",)

_METRICS: tuple[Metric, ...] = (
    # --- static: from the checkpoint alone -------------------------------------------
    Metric("params", _LM, "static", "number of parameters", per_setting=False),
    Metric("nonfinite", _LM, "static", "count of NaN/Inf weights", per_setting=False),
    Metric("nonfinite_frac", _LM, "static", "fraction of NaN/Inf weights", per_setting=False),
    Metric("zero_frac", _LM, "static", "fraction of weights exactly zero", per_setting=False),
    Metric("stable_rank", _L, "static", "||W||_F^2 / ||W||_2^2 (with --spectral)", per_setting=False),
    Metric("effective_rank", _L, "static", "exp(entropy of normalized singular values) (with --spectral)", per_setting=False),
    Metric("rel_error", _LM, "static", "||Q(W) - W|| / ||W|| in the format"),
    Metric("sqnr_db", _LM, "static", "signal-to-quantization-noise ratio, dB"),
    Metric("saturated", _LM, "static", "fraction of weights whose nearest rounding lies beyond the largest finite value (the cast clamps them)"),
    Metric("flushed", _LM, "static", "fraction of nonzero weights that quantize to zero"),
    Metric("ulp_rel_median", _LM, "static", "median of ULP(w)/|w| over nonzero weights"),
    Metric("beta_pred", _LM, "static", "fraction of weights an Adam-like step of size lr moves by more than ULP/2"),
    Metric("lr", ("layer", "model", "setting"), "static", "the planned learning rate"),
    Metric("bits", ("layer", "model", "setting"), "static", "bits per element of the weight format"),
    Metric("block_scaled", ("layer", "model", "setting"), "static",
           "1 when the format scales each block (or channel) from its own amax: what saturates there is the recipe's clamp of block maxima, not a weight out of range"),
    Metric("rounds_stored", ("layer", "model", "setting"), "static",
           "1 when the plan updates weights stored in the format without fp32 master weights under nearest rounding (a static-only run: its --master-weights and --rounding), else 0"),
    Metric("probed", ("layer", "model", "setting"), "static",
           "1 when a probe burst ran a setting in the format (its run forecast, beta_run, measures what beta_pred estimates), else 0"),
    # --- dynamic: from probe bursts (v0.2) -----------------------------------------
    Metric("lora", ("layer", "model", "setting"), "dynamic", "1 when the setting trains LoRA adapters, else 0"),
    Metric("psi", _LM, "dynamic", "gradient capture ||P_S g|| / ||g|| by the realized subspace"),
    Metric("psi_rank", _LM, "dynamic", "capture by the best subspace of the setting's rank"),
    Metric("psi_val", _M, "dynamic", "psi on the held-out batch"),
    Metric("r_star", _L, "dynamic", "smallest rank whose best subspace captures psi_target"),
    Metric("p_t", _M, "dynamic", "fraction of sampled admissible moves that lower the realized loss"),
    Metric("p_t_lo", _M, "dynamic", "lower end of the 95% Wilson interval of p_t"),
    Metric("p_t_hi", _M, "dynamic", "upper end of the 95% Wilson interval of p_t"),
    Metric("p_t_uniform", _M, "dynamic", "p_t under the uniform-on-sphere proposal"),
    Metric("p_t_val", _M, "dynamic", "p_t judged on the held-out loss"),
    Metric("p_t_descent", _M, "dynamic", "mean relative loss drop of p_t's optimizer moves (blocked moves count 0): the magnitude beside p_t's sign"),
    Metric("p_t_descent_lo", _M, "dynamic", "lower end of the 95% interval of p_t_descent"),
    Metric("p_t_descent_hi", _M, "dynamic", "upper end of the 95% interval of p_t_descent"),
    Metric("p_t_surrogate", _L, "dynamic", "per-layer surrogate p_t: fraction with g^T u < 0"),
    Metric("blocked", _M, "dynamic", "fraction of proposed moves that quantize to zero"),
    Metric("beta", _LM, "dynamic", "fraction of weights whose lattice cell changed in a step"),
    Metric("beta_min", _LM, "dynamic", "smallest per-step beta of the burst"),
    Metric("beta_proposed", _LM, "dynamic", "fraction of proposed steps larger than ULP/2"),
    Metric("beta_eff", _M, "dynamic", "fraction of probed activation tensors whose cell ids changed"),
    Metric("beta_eff_elem", _LM, "dynamic", "fraction of activation elements whose cell changed"),
    Metric("ulp_mass_above_half", _L, "dynamic", "histogram mass of |delta|/ULP above 0.5"),
    Metric("rank", ("layer", "model", "setting"), "dynamic", "the planned LoRA rank (the layer's, with a rank_pattern); None for full fine-tuning"),
    Metric("beta_adapter", _L, "dynamic", "fraction of LoRA adapter parameters whose cell changed per step"),
    Metric("p_t_samples", _M, "dynamic", "moves sampled for p_t (after early stopping)"),
    Metric("p_t_uniform_lo", _M, "dynamic", "lower end of the 95% Wilson interval of p_t_uniform"),
    Metric("p_t_uniform_hi", _M, "dynamic", "upper end of the 95% Wilson interval of p_t_uniform"),
    Metric("p_t_layer", _L, "dynamic", "realized p_t of moves confined to the layer (with --per-layer-p)"),
    Metric("p_t_layer_lo", _L, "dynamic", "lower end of the 95% Wilson interval of p_t_layer"),
    Metric("p_t_layer_hi", _L, "dynamic", "upper end of the 95% Wilson interval of p_t_layer"),
    Metric("loss", _M, "dynamic", "realized training loss at the end of the burst"),
    Metric("val_loss", _M, "dynamic", "held-out loss at the end of the burst"),
    Metric("loss_delta", _M, "dynamic", "realized loss change over the burst"),
    # --- dynamic: the outlook over the planned run (v0.4) ---------------------------
    Metric("progress", _M, "dynamic", "relative drop of the realized loss on the evaluation batch over the burst"),
    Metric("progress_lo", _M, "dynamic", "lower end of the 95% interval of progress (from the burst's loss curve)"),
    Metric("progress_hi", _M, "dynamic", "upper end of the 95% interval of progress"),
    Metric("progress_val", _M, "dynamic", "relative drop of the held-out loss over the burst"),
    Metric("progress_master", _M, "dynamic", "relative drop of the loss at the unrounded fp32 master weights"),
    Metric("no_grad", _L, "dynamic", "true when the layer's gradient is exactly zero under this loss (its output never reaches it)"),
    Metric("grad_share", _L, "dynamic", "the layer's share of the squared gradient over what the setting trains"),
    Metric("beta_run", _LM, "dynamic", "fraction of weights forecast to change cell at least once within the planned run (model: gradient-weighted)"),
    Metric("run_moving", _LM, "dynamic", "fraction of the planned run's steps at which the weights still cross cells"),
    Metric("run_realized", _LM, "dynamic", "fraction of the run's lr budget the lattice turns into movement, relative to the peak lr's (1 unless nearest rounding without master weights loses decayed steps)"),
    Metric("horizon", _M, "dynamic", "bursts the planned run is worth: its realized lr budget over the burst's, LoRA going on at its end-of-burst rate"),
    Metric("horizon_growth", _M, "dynamic", "the horizon with LoRA's growth (lora_kappa) carried through the whole run, at least horizon: an upper bound"),
    Metric("lora_kappa", _M, "dynamic", "LoRA's growth of the per-step loss drop as both adapter factors move (drop ~ a t + b t^2, kappa = b/a)"),
    Metric("lora_accel", _M, "dynamic", "LoRA's rate of loss descent over the burst's second half divided by its mean rate (at least 1)"),
    Metric("stall_step", _LM, "dynamic", "the step of the planned run from which each step realizes less than half of what it would at the peak lr (train_steps: never)"),
    Metric("stall_lr", _M, "dynamic", "the scheduled lr at stall_step (the final lr when they move to the end)"),
    Metric("train_steps", _M, "dynamic", "length of the planned run the forecast looks ahead to"),
    Metric("score", _M, "dynamic", "predicted relative loss drop over the planned run: the burst's drop compounded over the run's horizon, down to 1% of the loss the burst leaves (ranks settings)"),
    Metric("score_growth", _M, "dynamic", "score over horizon_growth: LoRA's optimistic bound, growth carried through the run (reported, gates nothing; equal to score otherwise)"),
)

METRICS: dict[str, Metric] = {m.name: m for m in _METRICS}


def get_metric(name: str) -> Metric:
    from .errors import UnknownNameError

    try:
        return METRICS[name]
    except KeyError:
        raise UnknownNameError("metric", name, sorted(METRICS)) from None


def metric_names(scope: Scope | None = None) -> list[str]:
    return sorted(n for n, m in METRICS.items() if scope is None or scope in m.scopes)
