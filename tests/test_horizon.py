"""The forecast over the planned run against direct simulations (docs/definitions.md §4)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from helpers import tiny_llama_model

from hallway_audit.lattice import get_format
from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import BurstOptions, OptimizerSpec, PrecisionStack, Setting, Subspace, run_sweep
from hallway_audit.probe.crossing import ulp_histogram
from hallway_audit.probe.horizon import (
    STALL_EFFICIENCY,
    Schedule,
    beta_at_scale,
    burst_gain,
    effective_horizon,
    forecast_by_steps,
    growth_horizon,
    lora_acceleration,
    lora_kappa,
    master_cells_changed,
    relative_efficiency,
    rounding_efficiency,
    sr_moved_at_least_once,
    weighted_forecast,
)
from hallway_audit.probe.result import EXTRAPOLATION_FLOOR, score
from hallway_audit.probe.stats import wilson_interval


def test_schedule_warmup_peak_and_decay_ends():
    f = Schedule("cosine", steps=100, warmup=10, lr_min=1e-6).factors(1e-3)
    assert len(f) == 100
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in pairwise(f[10:]))  # decays monotonically
    assert Schedule("constant", steps=7).factors(1e-4) == [1.0] * 7
    lin = Schedule("linear", steps=11, lr_min=0.0).factors(1.0)
    assert lin[0] == 1.0 and lin[5] == pytest.approx(1 - 5 / 11)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "int4"])
def test_master_drift_forecast_equals_a_direct_simulation(fmt):
    """fp32 master weights take T constant sub-ULP steps; the forward reads Q(master).
    The forecast from a K-step burst (linear drift, gain T/K) must count the same cells."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 128, generator=g) * 0.05
    # per-weight steps of 1e-8 .. 1e-4 (log-uniform): some weights cross, some never do
    step = torch.randn(64, 128, generator=g).sign() * 10.0 ** (-8 + 4 * torch.rand(64, 128, generator=g))
    lattice = get_format(fmt).at(w0)
    burst, run = 8, 400
    master = w0.clone()
    for _ in range(burst):
        master += step
    after_burst = master.clone()
    for _ in range(run - burst):
        master += step
    direct = int(torch.count_nonzero(lattice.cell_id(master) != lattice.cell_id(w0)))
    forecast = master_cells_changed(get_format(fmt), w0, after_burst, burst_gain([1.0] * run, burst))
    assert abs(forecast - direct) <= 2  # float32 summation order differs at cell edges
    assert 0 < direct < w0.numel()  # a real test: some but not all cross


def test_stochastic_rounding_forecast_matches_monte_carlo():
    """Weights stored on bf16 without master weights, each step r ULP in one direction;
    the forecast P(moved at least once) = 1 - prod(1 - min(1, r s_t)) against simulation."""
    fmt = get_format("bf16")
    g = torch.Generator().manual_seed(1)
    # the geometric means of the bins [1/64, 1/32), [1/16, 1/8), [1/4, 1/2)
    ratios = torch.tensor([math.sqrt(2.0 ** -6 * 2.0 ** -5), math.sqrt(2.0 ** -4 * 2.0 ** -3), math.sqrt(2.0 ** -2 * 2.0 ** -1)])
    w = fmt.quantize(torch.rand(3, 4000, generator=g) + 1.0)  # [1, 2): one binade, ULP 2^-7
    ulp = fmt.at(w).ulp(w)
    scales = Schedule("cosine", steps=40, lr_min=0.0).factors(1.0)
    moved = torch.zeros_like(w, dtype=torch.bool)
    stored = w.clone()
    for s in scales:
        proposal = stored + ratios[:, None] * s * ulp
        stored = fmt.at(proposal).quantize(proposal, "stochastic", g)
        moved |= fmt.at(w).cell_id(stored) != fmt.at(w).cell_id(w)
    hist = ulp_histogram(ratios[:, None].expand(3, 4000) * ulp, ulp).tolist()
    forecast = sr_moved_at_least_once(hist, scales)
    k = int(moved.sum())
    lo, hi = wilson_interval(k, moved.numel())
    assert lo - 0.01 <= forecast <= hi + 0.01, (forecast, k / moved.numel())


def test_nearest_rounding_stalls_where_the_decayed_step_drops_below_half_a_ulp():
    """All steps at 1-2 ULP at the peak; cosine decay: the layer moves while
    scale * ratio > 1/2, and stalls once a step realizes less than half of what it
    realizes at the peak (per unit of intended step)."""
    hist = [0.0] * 14
    hist[7] = 100.0  # the bin [1, 2)
    scales = Schedule("cosine", steps=200, lr_min=0.0).factors(1.0)
    f = forecast_by_steps(hist, scales, floor=0.01)
    rates = [beta_at_scale(hist, s) for s in scales]
    first_still = next(t for t, r in enumerate(rates) if r <= 0.01)
    assert f.run_moving == pytest.approx(first_still / 200)
    eta = rounding_efficiency(hist, [1.0, *scales])
    relative = eta[1:] / eta[0]
    assert f.stall_step is not None and f.stall_step <= first_still  # efficiency falls before crossings end
    assert all(r < STALL_EFFICIENCY for r in relative[f.stall_step:])
    assert relative[f.stall_step - 1] >= STALL_EFFICIENCY
    assert f.run_realized == pytest.approx(sum(s * r for s, r in zip(scales, relative, strict=True)) / sum(scales))
    assert 0.3 < f.run_realized < 1.0
    constant = forecast_by_steps(hist, [1.0] * 50, 0.01)
    assert constant.stall_step is None and constant.run_realized == pytest.approx(1.0)


def test_the_model_stalls_when_the_layers_that_carry_the_gradient_stall():
    """fp8 without master weights quantizes the linear layers; norms, embeddings and head
    stay fp32 and accumulate. A linear layer that realizes little of its step even at the
    peak (most steps under half a ULP) but carries 60% of the gradient: the model's
    realized fraction is the share-weighted mean of the layers' (relative to each one's
    peak), so the model stalls once that mean stays under 1/2, and is not diluted by the
    fp32 layers whose realized movement is larger at the peak (mixing the histograms,
    0.3's rule, forecast no stall here; on the held-out decay subject it forecast 193-200
    where training fell below half its fp32-master twin's rate at 100-130). A layer that
    does not move at the peak is left out."""
    scales = Schedule("cosine", steps=200, warmup=20, lr_min=1e-6).factor_array(1e-3)
    coarse = [0.0] * 14
    coarse[5], coarse[6] = 95.0, 5.0  # [1/4, 1/2) and [1/2, 1): 5% cross at the peak
    fine = [0.0] * 14
    fine[-1] = 100.0  # fp32: every step moves the weight
    frozen = [0.0] * 14
    frozen[2] = 100.0  # under 1/8 ULP: never crosses, not even at the peak
    alone = forecast_by_steps(coarse, scales, 0.01)
    assert alone.stall_step is not None and 20 < alone.stall_step < 200
    rel = relative_efficiency(coarse, scales)
    assert rel is not None and relative_efficiency(frozen, scales) is None
    hists = {name: torch.tensor(h) for name, h in (("linear", coarse), ("embed", fine), ("norm", frozen))}
    forecasts = {"linear": alone, "embed": forecast_by_steps(fine, scales, 0.01),
                 "norm": forecast_by_steps(frozen, scales, 0.01)}
    model = weighted_forecast(forecasts, {"linear": 0.6, "embed": 0.35, "norm": 0.05}, hists, scales, 32, 0.01, True,
                              {"linear": rel, "norm": None})
    assert model is not None and model.stall_step is not None
    mean = (0.6 * rel + 0.35) / 0.95  # the norm frozen at the peak is left out
    assert mean[model.stall_step - 1] >= STALL_EFFICIENCY and all(mean[model.stall_step:] < STALL_EFFICIENCY)
    assert alone.stall_step < model.stall_step < 200  # later than the layer alone: 37% of the share goes on
    assert model.run_realized == pytest.approx((0.6 * alone.run_realized + 0.35) / 0.95)
    # the linear layer carrying less than half: the fp32 embedding keeps the model moving
    light = weighted_forecast(forecasts, {"linear": 0.3, "embed": 0.7, "norm": 0.0}, hists, scales, 32, 0.01, True,
                              {"linear": rel, "norm": None})
    assert light is not None and light.stall_step is None
    assert light.run_realized == pytest.approx(0.3 * alone.run_realized + 0.7)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3"])
def test_rounding_efficiency_matches_a_direct_simulation(fmt):
    """eta(s) = mean over weights of (travel on the lattice) / (intended travel) for one
    nearest-rounded step of s times a log-uniform spread of |delta|/ULP, against rounding
    real weights with the format."""
    g = torch.Generator().manual_seed(3)
    f = get_format(fmt)
    w = f.quantize(torch.rand(200_000, generator=g) + 1.0)  # [1, 2): one binade, one ULP
    ulp = f.at(w).ulp(w)
    ratio = 2.0 ** (-6 + 12 * torch.rand(200_000, generator=g))  # |delta| / ULP over 1/64 .. 64
    hist = ulp_histogram(ratio * ulp, ulp).tolist()
    for s in (1.0, 0.5, 0.1, 0.01):
        step = ratio * s * ulp
        moved = (f.at(w).quantize(w + step, "nearest") - w).abs()
        direct = float((moved / step).mean())
        assert rounding_efficiency(hist, [s])[0] == pytest.approx(direct, rel=0.03), (fmt, s)
    assert rounding_efficiency(hist, [0.0])[0] == 0.0 and rounding_efficiency([0.0] * 14, [1.0])[0] == 0.0


def test_lora_kappa_is_the_second_order_term_of_the_loss_along_the_adapter_path():
    """For a quadratic loss L(W) = <G, W> the drop along W0 + s (B0 + t dB)(A0 + t dA) is
    exactly a t + b t^2; lora_kappa recovers b / a from the start and end of a K-step burst."""
    g = torch.Generator().manual_seed(4)
    out, inp, r, k, scale = 12, 20, 3, 8, 2.0
    grad = torch.randn(out, inp, generator=g)
    a0 = torch.randn(r, inp, generator=g) / inp ** 0.5
    b0 = torch.zeros(out, r)
    # steps that descend: dB along -(G A0^T), dA along -(B^T G) for B = dB
    db = -1e-2 * (grad @ a0.T)
    da = -1e-2 * (db.T @ grad)
    start = {"w::A": a0, "w::B": b0}
    end = {"w::A": a0 + k * da, "w::B": b0 + k * db}
    kappa = lora_kappa({"w": grad}, {"w": (scale, r)}, start, end, k)

    def drop(t: float) -> float:
        return -float((grad.double() * (scale * (b0 + t * db).double() @ (a0 + t * da).double())).sum())

    b_term = (drop(2.0) - 2 * drop(1.0)) / 2  # drop(t) = a t + b t^2, drop(0) = 0
    a_term = drop(1.0) - b_term
    assert kappa == pytest.approx(b_term / a_term, rel=1e-4)  # end = start + K step is stored in float32
    assert kappa > 0
    # no growth shown (a frozen A): kappa 0; a burst that climbs: kappa 0
    assert lora_kappa({"w": grad}, {"w": (scale, r)}, start, {"w::A": a0, "w::B": b0 + k * db}, k) == 0.0
    assert lora_kappa({"w": grad}, {"w": (scale, r)}, start, {"w::A": a0 - k * da, "w::B": b0 - k * db}, k) == 0.0


def test_effective_horizon():
    flat = Schedule("constant", steps=400).factor_array(1e-4)
    assert effective_horizon(flat, 8) == pytest.approx(50.0)
    assert effective_horizon(flat, 8, realized=0.5) == pytest.approx(25.0)
    # past the burst the drop goes on at accel times the burst's mean rate: (K + a (tau - K)) / K
    assert effective_horizon(flat, 8, accel=1.5) == pytest.approx((8 + 1.5 * 392) / 8)
    assert effective_horizon(flat[:4], 8, accel=3.0) == pytest.approx(0.5)  # a run shorter than the burst
    assert effective_horizon(flat, 0) == 0.0
    # LoRA growth carried through the run: (tau + kappa tau^2) / (K + kappa K^2)
    assert growth_horizon(flat, 8, kappa=0.01) == pytest.approx((400 + 0.01 * 400 ** 2) / (8 + 0.01 * 64))
    assert growth_horizon(flat, 8) == pytest.approx(effective_horizon(flat, 8))
    assert growth_horizon(flat, 0) == 0.0


def test_score_compounds_the_burst_and_ranks_settings_that_exhaust_the_loss_by_their_drop():
    # below the floor: the burst's drop compounded over the horizon, exactly
    assert score(0.1, None, None, 6.25) == pytest.approx(1 - 0.9**6.25)
    assert score(0.5, None, None, 0.5) == pytest.approx(1 - 0.5**0.5)  # a run shorter than the burst
    assert score(-0.02, None, None, 6.25) == -0.02 and score(None, None, None, 6.25) is None
    # past it: the remaining loss is EXTRAPOLATION_FLOOR of what the burst left, whatever the horizon
    assert score(0.671, None, None, 7.20) == pytest.approx(1 - EXTRAPOLATION_FLOOR * 0.329)
    assert score(0.671, None, None, 70.0) == score(0.671, None, None, 7.20)
    # the planted subject's figures: nf4 LoRA r4 (burst drop 0.671, horizon 7.20, trains to
    # 0.940) and attention-only r4 (0.610 with a larger acceleration, horizon 8.80, trains
    # to 0.904). Compounded without the floor the attention-only plan ranked first.
    assert 1 - 0.390**8.80 > 1 - 0.329**7.20
    assert score(0.671, None, None, 7.20) > score(0.610, None, None, 8.80)
    # a longer horizon never lowers the score (score_growth >= score)
    values = [score(0.3, None, None, h) for h in (0.5, 1, 2, 4, 8, 16, 64)]
    assert values == sorted(values)


def test_lora_acceleration_is_the_late_rate_over_the_mean_rate():
    k, l0 = 32, 2.0
    # log-loss gains c t^2: mean rate c K; over the second half (t = K/2+1 .. K, centred on
    # m = (3K/2 + 1) / 2) the least-squares slope of c t^2 is 2 c m
    c = 1e-4
    losses = [l0 * math.exp(-c * t * t) for t in range(1, k + 1)]
    assert lora_acceleration(l0, losses) == pytest.approx((1.5 * k + 1) / k)
    # a steady descent is not accelerated; a decelerating one counts as steady (at least 1)
    assert lora_acceleration(l0, [l0 * math.exp(-0.01 * t) for t in range(1, k + 1)]) == pytest.approx(1.0)
    assert lora_acceleration(l0, [l0 * math.exp(-0.1 * math.sqrt(t)) for t in range(1, k + 1)]) == 1.0
    # nothing to measure: too short, a rising loss, non-finite values
    assert lora_acceleration(l0, losses[:7]) == 1.0
    assert lora_acceleration(l0, [l0 * (1 + 0.01 * t) for t in range(1, k + 1)]) == 1.0
    assert lora_acceleration(l0, [*losses[:-1], math.nan]) == 1.0


def test_beta_at_scale_is_exact_at_bin_edges():
    hist = [0.0] * 14
    hist[6], hist[7] = 30.0, 70.0  # [1/2, 1) and [1, 2)
    assert beta_at_scale(hist, 1.0) == pytest.approx(1.0)  # every ratio >= 1/2
    assert beta_at_scale(hist, 0.5) == pytest.approx(0.70)  # ratio * 1/2 > 1/2 <=> ratio > 1
    assert beta_at_scale(hist, 0.25) == pytest.approx(0.0)
    assert beta_at_scale(hist, 0.0) == 0.0 and beta_at_scale([0.0] * 14, 1.0) == 0.0


@pytest.mark.slow
def test_histogram_at_one_lr_predicts_beta_proposed_at_another():
    """Adam's step scales with lr: the burst's ULP histogram at lr 1e-3 predicts the
    fraction of steps above half a ULP in a real burst at lr 2.5e-4 (bf16, no master weights)."""
    model = tiny_llama_model()
    ids = torch.randint(0, 64, (24, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    train = {k: v[:16] for k, v in batch.items()}
    options = BurstOptions(steps=4, samples=8, micro_batch=8, eval_batch=8)
    settings = [Setting(PrecisionStack("bf16", None, "nearest", "none"), Subspace("full"), OptimizerSpec("adamw", lr))
                for lr in (1e-3, 2.5e-4)]
    result = run_sweep(model, settings=settings, loss_fn=causal_lm, loss_name="causal_lm", train=train, val=None,
                       options=options, model_source="t", calib="t", val_source="t")
    high, low = result.settings
    hist = [0.0] * 14
    for d in high.layers.values():
        for i, c in enumerate(d.hist.tolist()):
            hist[i] += c
    predicted = beta_at_scale(hist, 0.25)
    measured = low.model_metrics()["beta_proposed"]
    assert measured is not None and 0.05 < measured < 0.95  # the lr sits where it matters
    assert predicted == pytest.approx(measured, abs=0.08), (predicted, measured)


def test_schedule_flags_reach_the_forecast_and_bad_ones_are_usage_errors(capsys, tmp_path):
    """bf16 without master weights at a decaying lr: the weights stop crossing cells
    part-way through the run, and the report says at which step and lr."""
    import json

    from helpers import EXAMPLE

    from hallway_audit.cli import main

    common = [str(EXAMPLE), "--calib", str(EXAMPLE / "calib.safetensors"), "--precision", "bf16", "--lr", "2e-4",
              "--steps", "3", "--samples", "8", "-q", "--format", "json"]
    code = main([*common, "--master-weights", "none", "--schedule", "cosine", "--train-steps", "300", "--lr-min", "0"])
    doc = json.loads(capsys.readouterr().out)
    [setting] = doc["settings"]
    m = setting["model"]
    assert doc["dynamic"]["train_steps"] == 300 and doc["dynamic"]["schedule"]["kind"] == "cosine"
    assert m["train_steps"] == 300 and 0 < m["stall_step"] < 300
    assert m["stall_step"] / 300 <= m["run_moving"] + 0.01  # efficiency halves before the last crossing
    assert m["stall_lr"] < 2e-4 and 0 < m["run_realized"] < 1
    stalls = [f for f in doc["findings"] if f["rule"] == "run-stalls-in-decay"]
    assert (m["run_realized"] < 0.9) == bool(stalls)
    assert all(f["severity"] == "warning" and f"step {m['stall_step']} " in f["message"] for f in stalls)
    assert code == (1 if any(f["severity"] == "error" for f in doc["findings"]) else 0)
    for bad in (["--warmup", "300", "--train-steps", "300"], ["--lr-min", "1e-3"], ["--train-steps", "0"]):
        assert main([*common, *bad]) == 2, bad
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_lora_burst_reports_its_acceleration_and_a_growth_bound_above_its_score():
    """The burst's own losses give lora_accel; the ranking horizon continues at that rate;
    the gate's score_growth (growth carried through the run) is never below the score."""
    model = tiny_llama_model()
    ids = torch.randint(0, 64, (24, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.flip(1)}
    train = {k: v[:16] for k, v in batch.items()}
    options = BurstOptions(steps=12, samples=4, micro_batch=8, eval_batch=8, schedule=Schedule("constant", steps=200))
    settings = [Setting(PrecisionStack("bf16", None, "nearest", "fp32"), sub, OptimizerSpec("adamw", 1e-3))
                for sub in (Subspace("lora", rank=4), Subspace("full"))]
    result = run_sweep(model, settings=settings, loss_fn=causal_lm, loss_name="causal_lm", train=train, val=None,
                       options=options, model_source="t", calib="t", val_source="t")
    lora, full = result.settings
    m = lora.model_metrics()
    accel = lora_acceleration(lora.initial_loss, [s.loss for s in lora.steps])
    assert m["lora_accel"] == pytest.approx(accel) and accel >= 1.0
    assert m["horizon"] == pytest.approx((12 + accel * (200 - 12)) / 12)
    assert m["horizon_growth"] >= m["horizon"] and m["score_growth"] >= m["score"] > 0
    # full fine-tuning: no acceleration, one horizon, one score
    f = full.model_metrics()
    assert f["lora_accel"] is None and f["horizon"] == pytest.approx(200 / 12)
    assert f["horizon_growth"] == pytest.approx(f["horizon"]) and f["score_growth"] == pytest.approx(f["score"])


def test_embedding_rows_without_gradient_do_not_count_as_stuck():
    """A batch that uses 8 of the vocabulary's 64 tokens moves 8 rows of the embedding;
    under accumulating (fp32) values every moved row crosses cells, so the table's
    beta_run is 1, not the 8/64 of its rows the task happens to use."""
    model = tiny_llama_model()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, 11, (24, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    train = {k: v[:16] for k, v in batch.items()}
    options = BurstOptions(steps=4, samples=8, micro_batch=8, eval_batch=8)
    setting = Setting(PrecisionStack("fp32"), Subspace("full"), OptimizerSpec("adamw", 1e-4))
    result = run_sweep(model, settings=[setting], loss_fn=causal_lm, loss_name="causal_lm", train=train, val=None,
                       options=options, model_source="t", calib="t", val_source="t")
    embed = next(d for name, d in result.settings[0].layers.items() if "embed_tokens" in name)
    assert vocab >= 32 and embed.forecast is not None
    assert embed.forecast.beta_run == pytest.approx(1.0)  # before: 8 / 64, the rows the batch uses


def test_embedding_rows_without_gradient_do_not_count_as_stuck_without_master_weights():
    """The same batch in bf16 without master weights: each step's crossing is judged from
    the ULP histogram, which keeps the 56 unused rows (their steps are exactly 0, as in the
    paper's histogram); the run forecast leaves them out. At lr 1e-2 every used row's step
    is many ULPs, so beta_run is ~1, not the 8/64 of the rows the batch happens to use."""
    model = tiny_llama_model()
    ids = torch.randint(3, 11, (24, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    train = {k: v[:16] for k, v in batch.items()}
    options = BurstOptions(steps=4, samples=8, micro_batch=8, eval_batch=8)
    setting = Setting(PrecisionStack("bf16", None, "nearest", "none"), Subspace("full"), OptimizerSpec("adamw", 1e-2))
    result = run_sweep(model, settings=[setting], loss_fn=causal_lm, loss_name="causal_lm", train=train, val=None,
                       options=options, model_source="t", calib="t", val_source="t")
    embed = next(d for name, d in result.settings[0].layers.items() if "embed_tokens" in name)
    rows, width = model.get_input_embeddings().weight.shape
    unused = (rows - 8) * width * options.steps
    assert embed.idle >= unused and int(embed.hist[0]) >= embed.idle  # the histogram keeps them
    assert int(embed.moving_hist().sum()) == int(embed.hist.sum()) - embed.idle
    assert embed.forecast is not None and embed.forecast.beta_run > 0.9  # before: <= 8 / 64


def test_the_forecast_is_the_same_in_every_process(tmp_path):
    """Sums over layers run in model order, not in a set's string-hash order, which Python
    seeds per process: two runs of one command under different PYTHONHASHSEED wrote
    run_realized 0.8856689037000608 and ...0606 (bf16 without master weights under cosine
    decay on the example) before; the documents are now byte-identical."""
    import os
    import subprocess
    import sys

    from helpers import EXAMPLE

    args = [sys.executable, "-m", "hallway_audit", str(EXAMPLE), "--precision", "bf16", "--master-weights", "none",
            "--lr", "3e-4", "--schedule", "cosine", "--warmup", "100", "--lr-min", "1e-6",
            "--calib", str(EXAMPLE / "calib.safetensors"), "--steps", "8", "--samples", "8", "-q", "--format", "json"]
    texts = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}.json"
        proc = subprocess.run([*args, "-o", str(out)], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        texts.append(out.read_bytes())
    assert texts[0] == texts[1]
