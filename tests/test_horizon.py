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
    Schedule,
    beta_at_scale,
    burst_gain,
    forecast_by_steps,
    master_cells_changed,
    sr_moved_at_least_once,
)
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
    scale * ratio > 1/2 and stalls from there to the end."""
    hist = [0.0] * 14
    hist[7] = 100.0  # the bin [1, 2)
    scales = Schedule("cosine", steps=200, lr_min=0.0).factors(1.0)
    f = forecast_by_steps(hist, scales, floor=0.01)
    rates = [beta_at_scale(hist, s) for s in scales]
    first_still = next(t for t, r in enumerate(rates) if r <= 0.01)
    assert f.stall_step == first_still
    assert scales[first_still] <= 0.5 and scales[first_still - 1] > 0.25  # ratio < 2 needs scale > 1/4
    assert f.run_moving == pytest.approx(first_still / 200)
    assert forecast_by_steps(hist, [1.0] * 50, 0.01).stall_step is None


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
    assert m["run_moving"] == pytest.approx(m["stall_step"] / 300, abs=0.02)
    assert m["stall_lr"] < 2e-4
    stalls = [f for f in doc["findings"] if f["rule"] == "run-stalls-in-decay"]
    assert (m["run_moving"] < 0.5) == bool(stalls) and code == (1 if stalls else 0)
    for bad in (["--warmup", "300", "--train-steps", "300"], ["--lr-min", "1e-3"], ["--train-steps", "0"]):
        assert main([*common, *bad]) == 2, bad
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
