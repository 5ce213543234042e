"""Known answers for probe bursts (docs/definitions.md §4 to §6), run through the library on tiny models.

Each test builds a model whose answer is known in closed form: a loss linear in the
weights (constant gradient C: psi_star is C's spectrum; half of all uniform moves
descend; every optimizer move descends), a rank-1 gradient, weights bounded away from
binade edges so that a bf16 ULP is exactly 2^-8 (sub-ULP steps: beta is 0 under
nearest rounding, lr/ULP in expectation under stochastic rounding or fp32 master
weights), and a tiny Llama for the structural facts (full fine-tuning captures the
whole gradient; attention-only LoRA captures less than all-linear).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_llama_model
from torch import nn

from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import BurstOptions, OptimizerSpec, PrecisionStack, Setting, Subspace, run_sweep
from hallway_audit.probe import burst as burst_module
from hallway_audit.probe.psi import psi_star_at, psi_star_curve, r_star, singular_values
from hallway_audit.probe.realize import Realization, magnitude_mask, two_four_mask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def setting(weights="fp32", *, rounding="nearest", master="fp32", kind="full", rank=0, targets="all-linear",
            sparsity=0.0, mask="magnitude", opt="adamw", lr=1e-4, weight_decay=0.0) -> Setting:
    return Setting(
        PrecisionStack(weights, None, rounding, master),
        Subspace(kind, rank, targets, sparsity=sparsity, mask=mask),
        OptimizerSpec(opt, lr, weight_decay=weight_decay),
    )


def sweep(module, settings, loss_fn, batch, val=None, **options):
    opts = BurstOptions(**{"steps": 2, "samples": 4, "micro_batch": 4, **options})
    return run_sweep(module, settings=settings, loss_fn=loss_fn, loss_name="test", train=batch, val=val,
                     options=opts, model_source="test", calib="test", val_source="test").settings


def dummy_batch(n: int = 8) -> dict[str, torch.Tensor]:
    """Losses below ignore the batch; the sweep still needs examples to sample micro-batches from."""
    return {"inputs": torch.zeros(n, 1)}


class Captured:
    """Records every Realization run_burst builds, to look at the state a burst ends in."""

    def __init__(self, monkeypatch):
        self.instances: list[Realization] = []
        outer = self

        class Recording(Realization):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                outer.instances.append(self)

        monkeypatch.setattr(burst_module, "Realization", Recording)


def check_interval(m: dict) -> None:
    for key in ("p_t", "p_t_uniform"):
        if m[key] is not None:
            assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"]


# ----------------------------------------------------------------------------- psi_star in a burst


def test_rank_one_gradient_gives_psi_star_one_in_a_burst():
    g = gen(0)
    u, v = torch.randn(16, generator=g), torch.randn(32, generator=g)
    model = nn.Sequential(nn.Linear(32, 16))

    def bilinear(module, batch):  # u^T W v: dL/dW = u v^T, exactly rank 1
        return u @ module[0].weight @ v

    full, lora = sweep(model, [setting(), setting(kind="lora", rank=1)], bilinear, dummy_batch())
    for result in (full, lora):
        layer = result.layers["0"]
        assert layer.psi_star[1] == pytest.approx(1.0, abs=1e-9)
        assert layer.r_star == 1
        assert layer.matrix_rank == 16
    # the best rank-1 update captures everything; the bias has no gradient to miss
    assert lora.psi_rank == pytest.approx(1.0, abs=1e-9)
    assert lora.layers["0"].planned_rank == 1
    assert full.psi_rank == pytest.approx(1.0, abs=1e-12)


def test_psi_star_and_psi_rank_of_a_constant_full_rank_gradient():
    g = gen(1)
    c = torch.randn(12, 20, generator=g)
    model = nn.Linear(20, 12, bias=False)

    def linear(module, batch):  # dL/dW = C
        return (module.weight * c).sum()

    s = np.linalg.svd(c.double().numpy(), compute_uv=False)
    psi_star = [math.sqrt((s[:r] ** 2).sum() / (s**2).sum()) for r in range(1, 13)]
    results = sweep(model, [setting(kind="lora", rank=r) for r in (1, 4, 12)], linear, dummy_batch(), psi_target=0.9)
    for r, result in zip((1, 4, 12), results, strict=True):
        layer = result.layers[""]
        assert layer.psi_star[1] == pytest.approx(psi_star[0], rel=1e-6)
        assert layer.psi_star[8] == pytest.approx(psi_star[7], rel=1e-6)
        assert layer.psi_star[12] == pytest.approx(1.0, abs=1e-9)
        assert all(layer.psi_star[k] < 1.0 for k in (1, 2, 4, 8))
        assert layer.r_star == next(k for k in range(1, 13) if psi_star[k - 1] >= 0.9)
        assert result.psi_rank == pytest.approx(psi_star[r - 1], rel=1e-6)
    assert results[-1].psi_rank == pytest.approx(1.0, abs=1e-9)
    assert r_star(psi_star_curve(singular_values(c)), 0.9) == results[0].layers[""].r_star
    assert psi_star_at(psi_star_curve(singular_values(c)), 4) == pytest.approx(results[1].psi_rank, rel=1e-6)


# ----------------------------------------------------------------------------- LoRA tangent space in a burst


@pytest.mark.parametrize("inside", [True, False])
def test_lora_psi_at_step_zero_follows_row_a(monkeypatch, inside):
    """B = 0 at the start, so P_S(G) = G P_A: psi is 1 when row(G) lies in row(A), 0 when orthogonal."""
    captured = Captured(monkeypatch)
    model = nn.Linear(24, 16, bias=False)
    cache: dict[str, torch.Tensor] = {}

    def loss(module, batch):
        if "c" not in cache:
            a = captured.instances[-1].phi["weight::A"].detach().clone()  # the adapter's initial A
            g = gen(3)
            if inside:
                rows = a  # row(C) = row(A)
            else:
                q, _ = torch.linalg.qr(torch.cat([a.T, torch.randn(24, 24, generator=g)], dim=1).double())
                rows = q[:, a.shape[0]:].T.float()  # an orthonormal basis of row(A)'s complement
            cache["c"] = torch.randn(16, rows.shape[0], generator=g) @ rows
        return (module.weight * cache["c"]).sum()

    (result,) = sweep(model, [setting(kind="lora", rank=3)], loss, dummy_batch(), steps=1, samples=1)
    psi0 = result.steps[0].psi
    assert result.layers[""].psi[0] == psi0
    if inside:
        assert psi0 == pytest.approx(1.0, abs=1e-5)
    else:
        assert psi0 == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------- a tiny transformer


@pytest.fixture(scope="module")
def tiny_llama():
    model = tiny_llama_model()
    ids = torch.randint(0, 64, (12, 10), generator=gen(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, batch


def test_full_fine_tuning_captures_the_whole_gradient(tiny_llama):
    model, batch = tiny_llama
    full, lora = sweep(model, [setting(kind="full"), setting(kind="lora", rank=2)], causal_lm, batch, steps=2)
    assert full.psi_rank == pytest.approx(1.0, abs=1e-9)
    for step in full.steps:
        assert step.psi == pytest.approx(1.0, abs=1e-9)
    for name, layer in full.layers.items():
        assert layer.trainable
        assert all(p == pytest.approx(1.0, abs=1e-9) for p in layer.psi if p is not None), name
        if layer.psi_rank is not None:
            assert layer.psi_rank == pytest.approx(1.0, abs=1e-9)
    # LoRA at step 0 (B = 0, random A of rank 2 in 32 input dimensions) captures ~sqrt(2/32) of a target
    targets = [name for name, layer in lora.layers.items() if layer.trainable]
    assert targets and all(name.endswith("_proj") for name in targets)
    for name in targets:
        assert lora.layers[name].psi[0] < 0.5
        assert lora.layers[name].psi[0] < full.layers[name].psi[0]
    assert lora.steps[0].psi < full.steps[0].psi
    assert lora.psi_rank < full.psi_rank
    # non-targets (embeddings, norms, head) are part of ||g|| and capture nothing
    assert lora.layers["model.embed_tokens"].psi[0] == 0.0
    assert lora.layers["model.embed_tokens"].psi_rank is None
    # B = 0: the LoRA model starts exactly at W0 (fp32, no rounding)
    assert lora.initial_loss == full.initial_loss


def test_attention_only_lora_captures_less_than_all_linear(tiny_llama):
    model, batch = tiny_llama
    attn, every = sweep(model, [setting(kind="lora", rank=4, targets="attention"),
                                setting(kind="lora", rank=4, targets="all-linear")], causal_lm, batch)
    assert attn.psi_rank < every.psi_rank
    assert attn.steps[0].psi < every.steps[0].psi
    m_attn, m_every = attn.model_metrics(), every.model_metrics()
    assert m_attn["psi"] < m_every["psi"]
    assert m_attn["psi_rank"] < m_every["psi_rank"]
    trainable = {name for name, layer in attn.layers.items() if layer.trainable}
    assert trainable and all(name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in trainable)
    # the attention layers' own psi_rank is the same in both (same gradient, same rank)
    for name in trainable:
        assert attn.layers[name].psi_rank == pytest.approx(every.layers[name].psi_rank, rel=1e-9)


def test_a_burst_is_reproducible(tiny_llama):
    model, batch = tiny_llama
    s = [setting("bf16", kind="lora", rank=2, rounding="stochastic", master="none")]
    first, second = sweep(model, s, causal_lm, batch), sweep(model, s, causal_lm, batch)
    assert first[0].model_metrics() == second[0].model_metrics()
    assert [vars(x) for x in first[0].steps] == [vars(x) for x in second[0].steps]
    third = sweep(model, s, causal_lm, batch, seed=1)
    assert third[0].model_metrics() != first[0].model_metrics()


# ----------------------------------------------------------------------------- beta under sub-ULP steps


N_OUT = N_IN = 64
ULP = 2.0**-8  # bf16 spacing on [0.5, 1)


@pytest.fixture(scope="module")
def sub_ulp_model():
    """|w| in [0.55, 0.95] (bf16 ULP exactly 2^-8 everywhere, no binade edge within reach) and a loss
    with constant gradient |C| >= 0.5, so every AdamW step moves every weight by lr (to 1e-7)."""
    g = gen(11)
    sign = torch.where(torch.rand(N_OUT, N_IN, generator=g) < 0.5, -1.0, 1.0)
    w = sign * (0.55 + 0.4 * torch.rand(N_OUT, N_IN, generator=g))
    c = torch.where(torch.rand(N_OUT, N_IN, generator=g) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(N_OUT, N_IN, generator=g))
    model = nn.Linear(N_IN, N_OUT, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)

    def loss(module, batch):
        return (module.weight * c).sum()

    return model, loss


def expected_crossings_bound(lr: float, steps: int) -> tuple[float, float]:
    """Crossings ~ Binomial(n * steps, lr / ULP) (SR draws, or fp32 master weights at uniform
    positions within their cells): mean +- 5 standard deviations, as a fraction per step."""
    n = N_OUT * N_IN * steps
    p = lr / ULP
    sd = math.sqrt(n * p * (1 - p))
    return (n * p - 5 * sd) / n, (n * p + 5 * sd) / n


def test_sub_ulp_steps_never_cross_under_nearest_rounding_without_master_weights(sub_ulp_model):
    model, loss = sub_ulp_model
    lr = 1e-5  # 195x below ULP/2
    results = sweep(model, [setting("bf16", master="none", opt="adamw", lr=lr),
                            setting("bf16", master="none", opt="sgd", lr=lr)], loss, dummy_batch(), steps=4, samples=8)
    for result in results:
        m = result.model_metrics()
        assert m["beta"] == 0.0 and m["beta_min"] == 0.0
        assert m["beta_proposed"] == 0.0
        assert all(step.beta == 0.0 for step in result.steps)
        assert result.steps[-1].loss == result.initial_loss  # nothing moved
        # every admissible move of norm R (the median proposed step) rounds back: blocked
        assert m["blocked"] == 1.0
        assert m["p_t"] == 0.0 and m["p_t_uniform"] == 0.0
        assert result.layers[""].metrics(None, None)["ulp_mass_above_half"] == 0.0
        check_interval(m)


@pytest.mark.parametrize("rounding, master", [("stochastic", "none"), ("nearest", "fp32")])
def test_sub_ulp_steps_cross_at_rate_lr_over_ulp_with_sr_or_master_weights(sub_ulp_model, rounding, master):
    model, loss = sub_ulp_model
    lr, steps = 1e-5, 4
    (result,) = sweep(model, [setting("bf16", rounding=rounding, master=master, lr=lr)], loss, dummy_batch(),
                      steps=steps, samples=4)
    m = result.model_metrics()
    assert m["beta"] > 0.0
    assert m["beta_proposed"] == 0.0  # no single step exceeds ULP/2
    lo, hi = expected_crossings_bound(lr, steps)
    assert lo <= m["beta"] <= hi
    check_interval(m)


def test_sgd_full_fine_tuning_with_fp32_master_weights_crosses(sub_ulp_model):
    model, loss = sub_ulp_model
    # SGD steps are lr * |C| with |C| in [0.5, 1.5]: still far below ULP/2 = 2e-3
    (result,) = sweep(model, [setting("bf16", master="fp32", opt="sgd", lr=1e-5)], loss, dummy_batch(), steps=4)
    assert result.model_metrics()["beta"] > 0.0
    assert result.model_metrics()["beta_proposed"] == 0.0


# ----------------------------------------------------------------------------- p_t on a linear loss


@pytest.fixture(scope="module")
def linear_loss_model():
    g = gen(21)
    c = torch.randn(24, 32, generator=g)
    model = nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(24, 32, generator=g) * 0.1)

    def loss(module, batch):
        return (module.weight * c).sum()

    return model, loss


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_linear_loss_uniform_moves_descend_half_the_time_optimizer_moves_always(linear_loss_model, opt):
    model, loss = linear_loss_model
    (result,) = sweep(model, [setting("fp32", opt=opt, lr=1e-3)], loss, dummy_batch(), steps=2, samples=200,
                      sigma=0.0, early_stop=False)
    m = result.model_metrics()
    # an exact symmetry: u and -u are equally likely and L(theta + u) - L(theta) = C . u
    assert m["p_t_uniform_lo"] <= 0.5 <= m["p_t_uniform_hi"]
    assert m["p_t_samples"] == 400  # two states x 200, no early stop
    # u = -R D(g) / |D(g)| with D positive diagonal: C . u < 0 always
    assert m["p_t"] == 1.0 and m["p_t_hi"] == 1.0
    assert m["p_t_lo"] > 0.5
    assert m["blocked"] == 0.0
    check_interval(m)
    # the realized loss goes down by lr |C|^2 per SGD step (linear loss): strictly down either way
    assert m["loss_delta"] < 0


def test_p_t_descent_is_the_relative_drop_of_each_move(linear_loss_model):
    """Beside p_t's sign, its magnitude: on L = C.W + 100 an SGD move u = -R C / |C| drops the
    loss by exactly R |C|, so every move's relative drop is R |C| / L at its state."""
    model, _ = linear_loss_model
    g = gen(21)
    cmat = torch.randn(24, 32, generator=g)  # the fixture's C: same seed, drawn first

    def loss(module, batch):
        return (module.weight * cmat).sum() + 100.0

    w0 = model.weight.detach().clone()
    (result,) = sweep(model, [setting("fp32", opt="sgd", lr=1e-3)], loss, dummy_batch(), steps=1, samples=16,
                      sigma=0.0, early_stop=False)
    norm = float(cmat.norm())
    bases = [float((w0 * cmat).sum()) + 100.0, float(((w0 - 1e-3 * cmat) * cmat).sum()) + 100.0]
    expected = [state.radius * norm / base for state, base in zip(result.pt, bases, strict=True)]
    for state, e in zip(result.pt, expected, strict=True):
        assert state.descent == pytest.approx([e] * 16, rel=1e-4)
    m = result.model_metrics()
    assert m["p_t_descent"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert m["p_t_descent_lo"] <= m["p_t_descent"] <= m["p_t_descent_hi"]


def test_early_stop_stops_once_the_interval_excludes_half(linear_loss_model):
    model, loss = linear_loss_model
    (result,) = sweep(model, [setting("fp32", lr=1e-3)], loss, dummy_batch(), steps=1, samples=200, sigma=0.0)
    for state in result.pt:
        assert state.optimizer.n == 16  # 16/16 descents: [0.806, 1] excludes 1/2 at the first check


def test_held_out_p_t_on_the_same_loss_agrees(linear_loss_model):
    model, loss = linear_loss_model
    (result,) = sweep(model, [setting("fp32", opt="sgd", lr=1e-3)], loss, dummy_batch(), val=dummy_batch(4),
                      steps=1, samples=16, sigma=0.0, early_stop=False)
    m = result.model_metrics()
    assert m["p_t_val"] == 1.0
    assert m["psi_val"] == pytest.approx(1.0, abs=1e-12)
    assert m["val_loss"] == m["loss"]


# ----------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("mask, sparsity", [("2:4", 0.5), ("magnitude", 0.75), ("random", 0.5)])
@pytest.mark.parametrize("precision", [("fp32", "nearest", "fp32"), ("bf16", "stochastic", "none")])
def test_pruned_weights_stay_exactly_zero_after_a_burst(monkeypatch, mask, sparsity, precision):
    captured = Captured(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    g = gen(4)
    batch = {"inputs": torch.randn(16, 16, generator=g), "targets": torch.randn(16, 8, generator=g)}

    def mse(module, b):
        return ((module(b["inputs"]) - b["targets"]) ** 2).mean()

    weights, rounding, master = precision
    s = setting(weights, rounding=rounding, master=master, kind="sparse", sparsity=sparsity, mask=mask,
                lr=1e-2, weight_decay=0.1)
    (result,) = sweep(model, [s], mse, batch, steps=3)
    real = captured.instances[-1]
    assert set(real.masks) == {"0.weight", "2.weight"}
    base = dict(model.named_parameters())
    for name, m in real.masks.items():
        w0 = base[name].detach()
        assert int(m.sum()) == round((1 - sparsity) * m.numel())
        if mask == "2:4":
            assert torch.equal(m, two_four_mask(w0))
        elif mask == "magnitude":
            assert torch.equal(m, magnitude_mask(w0, 1 - sparsity))
            assert float(w0.abs()[m].min()) >= float(w0.abs()[~m].max())
        final = real.phi[name].detach()
        assert bool((final[~m] == 0).all()), name
        assert bool((real.realized()[name][~m] == 0).all()), name
        assert not torch.equal(final[m], real.q(w0.float())[m])  # the kept weights did train
    assert result.model_metrics()["loss_delta"] < 0
    assert "0.bias" in real.trainable and "0.bias" not in real.masks  # dense elsewhere


# ----------------------------------------------------------------------------- update norms, R, the ULP threshold


def linear_in_every_parameter(model: nn.Module, seed: int = 31):
    """L = sum_p <C_p, p>: the gradient is C everywhere, so an SGD step is exactly -lr C."""
    g = gen(seed)
    cs = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}

    def loss(module, batch):
        params = dict(module.named_parameters())
        return sum((params[name] * c).sum() for name, c in cs.items())

    return cs, loss


def test_sgd_update_norm_and_p_t_radii_on_a_linear_loss(monkeypatch):
    """R = the median optimizer update norm (docs/definitions.md §6.1); per layer, the median of that layer's
    (weight and bias together) update norms."""
    calls = []
    real_measure = burst_module.measure_pt

    def recording(**kwargs):
        calls.append(kwargs)
        return real_measure(**kwargs)

    monkeypatch.setattr(burst_module, "measure_pt", recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 4))
    cs, loss = linear_in_every_parameter(model)
    lr = 1e-3
    (result,) = sweep(model, [setting(opt="sgd", lr=lr)], loss, dummy_batch(), steps=3, samples=2, per_layer_p=True)
    total = lr * math.sqrt(sum(float(c.square().sum()) for c in cs.values()))
    for step in result.steps:
        assert step.update_norm == pytest.approx(total, rel=1e-4)
    assert calls and all(c["radius"] == pytest.approx(total, rel=1e-4) for c in calls)
    for layer in ("0", "1"):
        expected = lr * math.sqrt(float(cs[f"{layer}.weight"].square().sum() + cs[f"{layer}.bias"].square().sum()))
        assert calls[0]["per_layer_radius"][layer] == pytest.approx(expected, rel=1e-4)
    assert set(result.layer_metrics()["0"]) >= {"p_t_layer", "p_t_layer_lo", "p_t_layer_hi"}


def test_sparse_sgd_steps_move_only_kept_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4))
    cs, loss = linear_in_every_parameter(model, seed=32)
    lr = 1e-3
    (result,) = sweep(model, [setting(kind="sparse", sparsity=0.5, mask="2:4", opt="sgd", lr=lr)], loss, dummy_batch(),
                      steps=2, samples=2)
    kept = 0.0
    for name, p in model.named_parameters():
        c = cs[name]
        kept += float((c * two_four_mask(p.detach())).square().sum()) if name.endswith("weight") else float(c.square().sum())
    for step in result.steps:
        assert step.update_norm == pytest.approx(lr * math.sqrt(kept), rel=1e-4)
    # psi of a masked layer: ||C * mask|| / ||C|| over weight and bias
    for layer in ("0", "1"):
        w, b = cs[f"{layer}.weight"], cs[f"{layer}.bias"]
        m = two_four_mask(dict(model.named_parameters())[f"{layer}.weight"].detach())
        expected = math.sqrt(float((w * m).square().sum() + b.square().sum()) / float(w.square().sum() + b.square().sum()))
        assert result.layers[layer].psi[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fraction", [0.75, 1.25])
def test_beta_proposed_and_the_ulp_histogram_at_the_half_ulp_threshold(sub_ulp_model, fraction):
    """AdamW moves every weight by lr: lr = 0.75 ULP/2 rounds back everywhere (beta = 0),
    lr = 1.25 ULP/2 crosses everywhere (beta = 1) under nearest rounding without master weights."""
    model, loss = sub_ulp_model
    lr = fraction * ULP / 2
    (result,) = sweep(model, [setting("bf16", master="none", lr=lr)], loss, dummy_batch(), steps=2, samples=2)
    m = result.model_metrics()
    crosses = fraction > 1
    assert m["beta"] == float(crosses) and m["beta_proposed"] == float(crosses)
    layer = result.layers[""].metrics(None, None)
    assert layer["ulp_mass_above_half"] == float(crosses)
    # |delta| / ULP = fraction / 2: 0.375 in [1/4, 1/2), 0.625 in [1/2, 1)
    assert layer["ulp_hist"]["1/2-1" if crosses else "1/4-1/2"] == 1.0
    if not crosses:
        assert result.steps[-1].loss == result.initial_loss  # nothing moved


def test_a_move_that_leaves_the_realized_loss_unchanged_is_not_a_descent():
    """p_t counts moves that *lower* the realized loss: on a loss whose float32 value cannot
    resolve the move (an offset of 1e8 has a spacing of 8), nothing descends, nothing is blocked."""
    g = gen(41)
    c = torch.randn(8, 8, generator=g)
    model = nn.Linear(8, 8, bias=False)

    def loss(module, batch):
        return (module.weight * c).sum() + torch.tensor(1e8)

    (result,) = sweep(model, [setting(lr=1e-4)], loss, dummy_batch(), steps=1, samples=16, early_stop=False)
    m = result.model_metrics()
    assert m["p_t"] == 0.0 and m["p_t_uniform"] == 0.0
    assert m["blocked"] == 0.0
    assert m["loss_delta"] == 0.0
