"""One probe burst: a few real optimizer steps under one setting, measured at every step.

Order of a step t (theta_t -> theta_{t+1}):
  1. realized weights W_q = Q(theta_t); loss and dL/dW on a fresh micro-batch;
  2. psi: ||P_S g|| / ||g|| per layer over every parameter full fine-tuning moves;
  3. the optimizer (torch.optim.AdamW / SGD, real steps) updates phi; the proposed
     W-space step is recorded, then written back (rounded onto the lattice when
     there are no master weights);
  4. beta (cells changed), beta_proposed (|proposed| > ULP/2), the ULP histogram;
  5. realized train and held-out loss, and the probe batch's activation cells
     (beta_eff) at theta_{t+1}.
p_t is measured afterwards at the states kept along the way (the first and the
last by default), with R = the median update norm of the whole burst.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..lattice import get_format
from ..model.data import MicroBatches, batch_size, take, token_count
from .crossing import ActivationCells, activation_changes, cell_changes, crossing_counts
from .engine import Batch, LossEvaluator, LossFn
from .estimate import pt_states as measured_states
from .events import BurstEvent, BurstProgress, Part
from .horizon import (
    Schedule,
    effective_horizon,
    forecast_layers,
    growth_horizon,
    lora_acceleration,
    lora_kappa,
    weighted_forecast,
)
from .psi import powers_of_two, psi_star_at, psi_star_curve, r_star, singular_values
from .pt import Direction, StateGradients, measure_pt, split_gradient
from .realize import Realization
from .result import LayerDynamics, SettingResult, StepRecord
from .settings import Setting
from .shares import SharesVerdict
from .targets import ParamInfo, linear_modules

# beta_eff compares the activation cells of consecutive steps over the burst's first steps
# only: recording every activation's cell costs about a fifth of a 32-step burst (20M-parameter
# Llama, bench/dynamic_cost.py), and the per-step rate needs no more than the 8 steps bursts
# used to have.
BETA_EFF_STEPS = 8


@dataclass(frozen=True)
class BurstOptions:
    steps: int = 32  # long enough to see LoRA take off (README "Does it predict?": 8 steps cannot)
    samples: int = 64
    p_every: int = 0  # measure p_t every N steps; 0 = at the first and the last state
    sigma: float = 0.5  # noise of the optimizer proposal, relative to its signal
    micro_batch: int = 8
    seed: int = 0
    psi_target: float = 0.9  # tau of r_star (the rule file's psi_target)
    # The planned run the forecast looks ahead to (None: 1000 steps at the constant lr),
    # and the per-step crossing rate below which a layer counts as not moving (the rule
    # file's beta_floor).
    schedule: Schedule | None = None
    beta_floor: float = 0.01
    per_layer_p: bool = False
    early_stop: bool = True
    eval_batch: int = 16  # the fixed evaluation batch: realized losses, p_t moves, activation cells


def _adam_preconditioner(opt: torch.optim.Optimizer, keys: list[str], params: list[Tensor]) -> Callable[[Direction], Direction]:
    """D(g) = g / (sqrt(v_hat) + eps) from AdamW's second moments (identity for SGD)."""
    if not isinstance(opt, torch.optim.AdamW):
        return lambda d: d
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    denoms: dict[str, Tensor] = {}
    for key, p in zip(keys, params, strict=True):
        state = opt.state.get(p, {})
        if "exp_avg_sq" in state:
            step = float(state["step"])
            denoms[key] = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt() + eps
    return lambda d: {k: (v / denoms[k] if k in denoms else v) for k, v in d.items()}


def _make_optimizer(setting: Setting, params: list[Tensor]) -> torch.optim.Optimizer:
    o = setting.optimizer
    if o.kind == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _sq(t: Tensor) -> float:
    return float(t.double().square().sum())


def _rank_capture(
    params: list[ParamInfo],
    g_full: dict[str, Tensor],
    real: Realization,
    layers: dict[str, LayerDynamics],
    tau: float,
) -> float | None:
    """psi_star(r), r_star and matrix rank per linear layer, psi_rank per layer; returns
    the model's psi_rank. A target's best rank-r capture is psi_star(r)^2 ||G||^2; a
    parameter trained densely captures all of ||G||^2, a masked one ||G * mask||^2,
    a frozen one nothing."""
    trainable = set(real.trainable)
    projected = real.project({n: g_full[n] for n in real.trainable}) if real.masks else {}
    captured: dict[str, float] = {}
    for p in params:
        g = g_full[p.name]
        if p.linear:
            curve = psi_star_curve(singular_values(g))
            d = layers[p.layer]
            d.matrix_rank = int(curve.numel())
            d.psi_star = {r: psi_star_at(curve, r) for r in powers_of_two(curve.numel())}
            d.r_star = r_star(curve, tau)
            if p.name in real.lora:
                d.planned_rank = real.lora[p.name][1]
                captured[p.name] = psi_star_at(curve, d.planned_rank) ** 2 * _sq(g)
                continue
        if p.name in real.masks:
            captured[p.name] = _sq(projected[p.name])
        elif p.name in trainable:
            captured[p.name] = _sq(g)
        else:
            captured[p.name] = 0.0
    names_of: dict[str, list[str]] = {}
    for p in params:
        names_of.setdefault(p.layer, []).append(p.name)
    for layer, d in layers.items():
        names = names_of.get(layer, [])
        total = sum(_sq(g_full[n]) for n in names)
        d.grad_seen = d.grad_seen or total > 0
        if real.kind == "lora" and not any(n in real.lora for n in names):
            d.psi_rank = None  # not a target: the model-level psi_rank counts it
        else:
            d.psi_rank = (sum(captured[n] for n in names) / total) ** 0.5 if total > 0 else None
    all_total = sum(_sq(g) for g in g_full.values())
    return (sum(captured.values()) / all_total) ** 0.5 if all_total > 0 else None


def _record_psi(params: list[ParamInfo], g: dict[str, Tensor], real: Realization, layers: dict[str, LayerDynamics]) -> float | None:
    """psi of this step's micro-batch gradient per layer (appended) and for the model."""
    projected = real.project(g)
    cap: dict[str, float] = {}
    tot: dict[str, float] = {}
    for p in params:
        tot[p.layer] = tot.get(p.layer, 0.0) + _sq(g[p.name])
        cap[p.layer] = cap.get(p.layer, 0.0) + (_sq(projected[p.name]) if p.name in projected else 0.0)
    for layer, d in layers.items():
        d.psi.append((cap[layer] / tot[layer]) ** 0.5 if tot[layer] > 0 else None)
        d.grad_seen = d.grad_seen or tot[layer] > 0
    total = sum(tot.values())
    return (sum(cap.values()) / total) ** 0.5 if total > 0 else None


def _record_crossings(
    real: Realization,
    stored: dict[str, Tensor],
    proposed_stored: dict[str, Tensor],
    next_stored: dict[str, Tensor],
    phi: tuple[dict[str, Tensor], dict[str, Tensor]] | None,
    layers: dict[str, LayerDynamics],
    layer_of: dict[str, str],
    layer_norms: dict[str, list[float]],
) -> tuple[float | None, float | None, float]:
    """beta, beta_proposed and the ULP histogram per layer (appended); returns the
    model's beta, beta_proposed and the step's W-space update norm.

    Each value is judged on the lattice it is stored on: the weight format where it
    applies, fp32 elsewhere; a LoRA target over a frozen base by its adapters
    (`phi` = adapters before and proposed by the optimizer), which are what moves.
    """
    per_layer: dict[str, list[float]] = {}  # changed, moved, count, squared norm
    for name in real.trainable:
        d = layers[layer_of[name]]
        c = per_layer.setdefault(d.name, [0, 0, 0, 0.0])
        proposed = proposed_stored[name] - stored[name]
        c[3] += _sq(proposed)
        fmt = real.weight_format(name)
        if fmt is not None:
            items = [(fmt, stored[name], next_stored[name], proposed)]
        else:
            assert phi is not None
            before, proposed_phi = phi
            keys = (name + "::A", name + "::B")
            items = [(real.phi_format(k), before[k], real.phi[k].detach(), proposed_phi[k] - before[k]) for k in keys]
        for f, b, a, p in items:
            changed, moved, hist = crossing_counts(f, b, a, p)
            d.hist += hist
            d.idle += p.numel() - int(torch.count_nonzero(p))
            c[0] += changed
            c[1] += moved
            c[2] += p.numel()
    for layer, (ch, mv, n, n2) in per_layer.items():
        layers[layer].beta.append(ch / n)
        layers[layer].beta_proposed.append(mv / n)
        layer_norms[layer].append(n2)  # weight and bias together: the layer's step
    total_changed, total_moved, count, sq = (sum(c[i] for c in per_layer.values()) for i in range(4))
    return (total_changed / count if count else None), (total_moved / count if count else None), sq**0.5


def _record_adapter_crossings(
    real: Realization,
    phi_before: dict[str, Tensor],
    layers: dict[str, LayerDynamics],
    layer_of: dict[str, str],
) -> None:
    """beta_adapter: LoRA adapter parameters whose cell changed in the step, on the
    lattice the adapters are stored on."""
    per_layer: dict[str, list[int]] = {}
    for k in real.adapter_keys():
        before, after = phi_before[k], real.phi[k].detach()
        c = per_layer.setdefault(layer_of[k.split("::")[0]], [0, 0])
        c[0] += cell_changes(real.phi_format(k), before, after)
        c[1] += before.numel()
    for layer, (ch, n) in per_layer.items():
        layers[layer].beta_adapter.append(ch / n)


def _record_grad_shares(g_full: dict[str, Tensor], real: Realization, layers: dict[str, LayerDynamics],
                        layer_of: dict[str, str]) -> None:
    """Each trainable layer's share of the squared gradient norm over what the setting trains."""
    sq: dict[str, float] = {}
    for name in real.trainable:
        sq[layer_of[name]] = sq.get(layer_of[name], 0.0) + _sq(g_full[name])
    total = sum(sq.values())
    for layer, v in sq.items():
        layers[layer].grad_share = v / total if total > 0 else None


def _shadow_loss(real: Realization, evaluator: LossEvaluator, stored: dict[str, Tensor], batch: Batch) -> float | None:
    """The loss at the unrounded master weights, where the forward rounds them onto a
    lattice: what the run drifts toward while sub-ULP steps accumulate (None when
    nothing trainable is rounded, or without master weights)."""
    if real.master != "fp32":
        return None
    bound = [n for n in real.trainable if (f := real.weight_format(n)) is not None and f.name != "fp32"]
    if not bound:
        return None
    weights = real.realized(stored)
    weights.update({n: stored[n] for n in bound})
    return evaluator.loss(weights, batch, "at the master weights")


def run_burst(
    setting: Setting,
    module: nn.Module,
    loss_fn: LossFn,
    loss_name: str,
    params: list[ParamInfo],
    base: dict[str, Tensor],
    train: Batch,
    val: Batch | None,
    options: BurstOptions,
    progress: BurstProgress | None = None,
    verdict: SharesVerdict | None = None,
) -> SettingResult:
    """One setting's burst; `verdict` carries what an earlier state learned about the loss
    (that it couples examples, so per-example shares are not worth recording)."""
    start = time.perf_counter()
    device = next(iter(base.values())).device
    cpu_gen = torch.Generator().manual_seed(options.seed)
    dev_gen = torch.Generator(device=device).manual_seed(options.seed + 1)
    real = Realization(setting, params, base, cpu_gen, dev_gen)
    evaluator = LossEvaluator(module, loss_fn, f" (setting {setting.id})")
    keys = list(real.phi)
    opt = _make_optimizer(setting, [real.phi[k] for k in keys])
    layer_of = {p.name: p.layer for p in params}
    trainable = set(real.trainable)
    layers = {p.layer: LayerDynamics(p.layer, trainable=False) for p in params}
    for p in params:
        layers[p.layer].fan_in_fan_out |= p.transposed
    for name in real.trainable:
        layers[layer_of[name]].trainable = True
    micro = MicroBatches(train, options.micro_batch, options.seed)

    # Activations probed for beta_eff: the linear layers this setting moves.
    linear_names = list(linear_modules(module))
    probed = [n for n in linear_names if f"{n}.weight" in trainable] or linear_names
    act_fmt = get_format(setting.precision.activations or setting.precision.weights)
    acts = ActivationCells(module, probed, act_fmt, quantize=setting.precision.activations is not None)
    # One fixed evaluation batch serves the realized train loss, the activation cells
    # of beta_eff (one shared forward per step) and the p_t moves; the held-out loss
    # uses the first examples of the held-out batch likewise.
    eval_batch = take(train, torch.arange(min(options.eval_batch, batch_size(train))))
    eval_val = take(val, torch.arange(min(options.eval_batch, batch_size(val)))) if val is not None else None

    p_states = measured_states(options.steps, options.p_every)

    def report(event: BurstEvent) -> None:
        if progress is not None:
            progress(event)

    with acts.attached():
        stored = real.stored()
        now = real.realized(stored)
        with acts.record() as cells:
            initial_loss = evaluator.loss(now, eval_batch, "at the start")
        initial_val = evaluator.loss(now, eval_val, "on the held-out batch at the start") if eval_val is not None else None
        prev_cells = dict(cells)

        # psi_star / r_star from the gradient of the whole training split: a
        # micro-batch gradient has rank <= its token count and would flatter low ranks.
        g_full, shares, no_shares = split_gradient(0, real, evaluator, module, train, now, micro.n, verdict)
        psi_rank = _rank_capture(params, g_full, real, layers, options.psi_target)
        _record_grad_shares(g_full, real, layers, layer_of)
        start_stored, start_phi = {k: v.clone() for k, v in stored.items()}, real.snapshot()
        shadow_start = _shadow_loss(real, evaluator, stored, eval_batch)
        report(BurstEvent(setting.id, "start", options.steps))

        snapshots: dict[int, dict[str, Tensor]] = {0: real.snapshot()} if 0 in p_states else {}
        # p_t at the first state reuses its losses and split gradient (the surrogate
        # only reads the trainable parameters' part of it)
        first = StateGradients(initial_loss, initial_val, {k: g_full[k] for k in real.trainable}, shares, no_shares) if 0 in p_states else None
        # LoRA's growth (lora_kappa) needs the start gradient of the adapted weights at the end of the
        # burst: kept off the accelerator (host memory) so the burst's device peak does not grow
        g_lora = {n: g_full[n].to("cpu") for n in real.lora}
        del g_full, shares
        steps: list[StepRecord] = []
        layer_norms: dict[str, list[float]] = {layer: [] for layer in layers}
        for t in range(options.steps):
            stored = real.stored()
            now = real.realized(stored)
            micro_loss, g = evaluator.loss_and_grad(now, micro.next(), f"at step {t}")
            psi_model = _record_psi(params, g, real, layers)

            phi_before = {k: v.detach().clone() for k, v in real.phi.items()} if real.lora else None
            grads = real.phi_grad(g)
            for k in keys:
                real.phi[k].grad = grads[k]
            opt.step()
            opt.zero_grad(set_to_none=True)
            proposed_stored = real.stored()
            phi_proposed = {k: v.detach().clone() for k, v in real.phi.items()} if real.lora else None
            real.write_back()
            next_stored = real.stored()

            phi_pair = (phi_before, phi_proposed) if phi_before is not None and phi_proposed is not None else None
            beta, beta_proposed, update_norm = _record_crossings(
                real, stored, proposed_stored, next_stored, phi_pair, layers, layer_of, layer_norms
            )
            if phi_before is not None:
                _record_adapter_crossings(real, phi_before, layers, layer_of)

            now = real.realized(next_stored)
            if t < BETA_EFF_STEPS:
                with acts.record() as cells:
                    loss = evaluator.loss(now, eval_batch, f"after step {t}")
                changes = activation_changes(prev_cells, cells)
                prev_cells = dict(cells)
            else:
                loss = evaluator.loss(now, eval_batch, f"after step {t}")
                changes = {}
            val_loss = evaluator.loss(now, eval_val, f"on the held-out batch after step {t}") if eval_val is not None else None
            for name, (ch, n) in changes.items():
                if name in layers:
                    layers[name].beta_eff_elem.append(ch / n)
            tensors_changed = sum(1 for ch, _ in changes.values() if ch > 0)
            elems = sum(n for _, n in changes.values())
            steps.append(
                StepRecord(
                    step=t,
                    loss=loss,
                    val_loss=val_loss,
                    micro_loss=micro_loss,
                    psi=psi_model,
                    beta=beta,
                    beta_proposed=beta_proposed,
                    beta_eff=tensors_changed / len(changes) if changes else None,
                    beta_eff_elem=sum(ch for ch, _ in changes.values()) / elems if elems else None,
                    update_norm=update_norm,
                )
            )
            if t + 1 in p_states:
                snapshots[t + 1] = real.snapshot()
            report(BurstEvent(setting.id, "step", options.steps, step=t + 1))

        radius = statistics.median(s.update_norm for s in steps) if steps else 0.0
        layer_radius = {layer: statistics.median(v) ** 0.5 for layer, v in layer_norms.items() if v}
        precondition = _adam_preconditioner(opt, keys, [real.phi[k] for k in keys])
        pt_states = []
        final = real.snapshot()
        p_gen = torch.Generator(device=device).manual_seed(options.seed + 2)
        for i, (t, snap) in enumerate(sorted(snapshots.items())):
            real.restore(snap)

            def pt_progress(part: Part, sample: int, layer: int, n_layers: int, i: int = i) -> None:
                report(BurstEvent(setting.id, "p_t", options.steps, state=i, states=len(snapshots), part=part,
                                  sample=sample, samples=options.samples if part != "setup" else 0,
                                  layer=layer, layers=n_layers))

            pt_states.append(
                measure_pt(
                    step=t,
                    real=real,
                    evaluator=evaluator,
                    train=train,
                    evaluation=eval_batch,
                    val=eval_val,
                    micro=micro,
                    precondition=precondition,
                    radius=radius,
                    samples=options.samples,
                    sigma=options.sigma,
                    generator=p_gen,
                    layer_of=layer_of,
                    early_stop=options.early_stop,
                    per_layer_radius=layer_radius if options.per_layer_p else None,
                    module=module,
                    known=first if t == 0 else None,
                    verdict=verdict,
                    progress=pt_progress if progress is not None else None,
                )
            )
            first = None
        real.restore(final)
        shadow_end = _shadow_loss(real, evaluator, real.stored(), eval_batch)
        report(BurstEvent(setting.id, "end", options.steps))
    schedule = options.schedule or Schedule()
    scales = schedule.factor_array(setting.optimizer.lr)
    # without the values no gradient reached: an unused embedding row is not stuck by the format
    hists = {layer: d.moving_hist() for layer, d in layers.items()}
    forecasts, relative = forecast_layers(real, start_stored, start_phi, hists, layer_of, scales, options.steps,
                                          options.beta_floor)
    for layer, f in forecasts.items():
        layers[layer].forecast = f
    # LoRA's drop grows as both factors move (B starts at 0): from the start gradient and the burst's steps
    kappa = lora_kappa(g_lora, real.lora, start_phi, real.phi, options.steps) if real.lora else 0.0
    stepwise = real.master == "none" and real.rounding == "nearest" and real.quantizes
    model_forecast = weighted_forecast(forecasts, {k: d.grad_share or 0.0 for k, d in layers.items()}, hists, scales,
                                       options.steps, options.beta_floor, stepwise, relative)
    realized = model_forecast.run_realized if model_forecast else 1.0
    # LoRA's descent speeds up through the burst: the run goes on from the rate it ends at
    accel = lora_acceleration(initial_loss, [s.loss for s in steps]) if real.lora else 1.0
    horizon = effective_horizon(scales, options.steps, realized, accel)
    return SettingResult(
        setting=setting,
        loss_name=loss_name,
        tokens=token_count(train),
        initial_loss=initial_loss,
        initial_val_loss=initial_val,
        steps=steps,
        layers=layers,
        pt=pt_states,
        psi_rank=psi_rank,
        seconds=time.perf_counter() - start,
        forwards=evaluator.forwards,
        backwards=evaluator.backwards,
        schedule=schedule,
        forecast=model_forecast,
        stall_lr=float(setting.optimizer.lr * scales[min(model_forecast.stall_step, len(scales) - 1)]
                       if model_forecast is not None and model_forecast.stall_step is not None
                       else setting.optimizer.lr * scales[-1]),
        horizon=horizon,
        # an upper bound: never below the horizon the ranking uses
        horizon_growth=max(growth_horizon(scales, options.steps, realized, kappa), horizon),
        kappa=kappa,
        accel=accel,
        shadow=(shadow_start, shadow_end) if shadow_start is not None and shadow_end is not None else None,
    )
