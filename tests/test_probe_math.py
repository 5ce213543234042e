"""Known answers for the probe's pure math (docs/definitions.md §5, §6): psi_star / r_star, the LoRA tangent
projection, sparsity masks, the Wilson interval, and how settings, plans and PEFT configs
become the grid of settings. No model is run here except through Realization on tiny ones.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hallway_audit.errors import UsageError
from hallway_audit.probe import (
    OptimizerSpec,
    PrecisionStack,
    Setting,
    Subspace,
    SweepSpec,
    apply_peft_config,
    from_mapping,
    load_plan,
    wilson_interval,
)
from hallway_audit.probe.psi import powers_of_two, psi_star_at, psi_star_curve, r_star, singular_values
from hallway_audit.probe.realize import Realization, magnitude_mask, random_mask, tangent_projection, two_four_mask
from hallway_audit.probe.settings import parse_rank, parse_sparsity
from hallway_audit.probe.stats import excludes_half
from hallway_audit.probe.targets import param_dict, parameter_universe, select_targets


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- psi_star / r_star


def test_rank_one_gradient_is_captured_by_rank_one():
    g = gen()
    u, v = torch.randn(24, generator=g), torch.randn(40, generator=g)
    curve = psi_star_curve(singular_values(torch.outer(u, v)))
    assert curve.numel() == 24
    assert psi_star_at(curve, 1) == pytest.approx(1.0, abs=1e-12)
    assert r_star(curve, 0.9) == 1
    assert r_star(curve, 0.999999) == 1


@pytest.mark.parametrize("shape", [(30, 30), (17, 45), (45, 17), (1, 9), (9, 1)])
def test_gram_singular_values_match_numpy_svd_energies(shape):
    """singular_values goes through the smaller Gram matrix: its energies s_i^2 agree
    with numpy's SVD to ~eps * s_1^2, for square, wide, tall, one-row and rank-deficient
    matrices."""
    g = gen(5)
    for m in (torch.randn(*shape, generator=g), torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)):
        want = np.linalg.svd(m.double().numpy(), compute_uv=False)
        got = singular_values(m).numpy()
        assert got.shape == want.shape
        assert np.all(np.diff(got) <= 0) and np.all(got >= 0)
        np.testing.assert_allclose(got**2, want**2, rtol=0, atol=1e-12 * float(want[0] ** 2))


def test_full_rank_matrix_needs_every_rank_for_full_capture():
    g = gen(1)
    m = torch.randn(12, 20, generator=g)
    s = np.linalg.svd(m.double().numpy(), compute_uv=False)
    curve = psi_star_curve(singular_values(m))
    n = 12
    for r in range(1, n):
        expected = math.sqrt(float((s[:r] ** 2).sum() / (s**2).sum()))
        assert psi_star_at(curve, r) == pytest.approx(expected, rel=1e-10)
        assert psi_star_at(curve, r) < 1.0
    assert psi_star_at(curve, n) == pytest.approx(1.0, abs=1e-12)
    assert psi_star_at(curve, 10 * n) == psi_star_at(curve, n)  # clamps past the matrix rank
    assert psi_star_at(curve, 0) == 0.0
    # monotone non-decreasing
    assert bool((curve[1:] >= curve[:-1]).all())
    # r_star: the smallest rank reaching tau (brute force over the same singular values)
    for tau in (0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        brute = next(r for r in range(1, n + 1) if math.sqrt((s[:r] ** 2).sum() / (s**2).sum()) >= tau - 1e-12)
        assert r_star(curve, tau) == brute
        assert psi_star_at(curve, brute) >= tau - 1e-12
        if brute > 1:
            assert psi_star_at(curve, brute - 1) < tau


def test_zero_gradient_has_no_r_star():
    curve = psi_star_curve(singular_values(torch.zeros(5, 7)))
    assert float(curve.sum()) == 0.0
    assert r_star(curve, 0.9) is None


def test_powers_of_two_reach_the_matrix_rank():
    assert powers_of_two(1) == [1]
    assert powers_of_two(8) == [1, 2, 4, 8]
    assert powers_of_two(12) == [1, 2, 4, 8, 12]


# ----------------------------------------------------------------------------- LoRA tangent space


def explicit_tangent(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """P_B G + G P_A - P_B G P_A with dense n x n projectors (float64)."""
    g, a, b = g.double(), a.double(), b.double()
    p_a = torch.linalg.pinv(a) @ a  # in x in, onto row(A)
    p_b = b @ torch.linalg.pinv(b)  # out x out, onto col(B)
    return p_b @ g + g @ p_a - p_b @ g @ p_a


def test_tangent_projection_matches_explicit_projectors():
    g0 = gen(2)
    g = torch.randn(10, 14, generator=g0, dtype=torch.float64)
    a = torch.randn(3, 14, generator=g0, dtype=torch.float64)
    b = torch.randn(10, 3, generator=g0, dtype=torch.float64)
    p = tangent_projection(g, a, b)
    assert torch.allclose(p, explicit_tangent(g, a, b), atol=1e-10)
    # idempotent, and an orthogonal projection: the residual is orthogonal to the image
    assert torch.allclose(tangent_projection(p, a, b), p, atol=1e-10)
    assert abs(float(((g - p) * p).sum())) < 1e-9
    # at B = 0 it is G P_A
    zero = torch.zeros_like(b)
    assert torch.allclose(tangent_projection(g, a, zero), explicit_tangent(g, a, zero), atol=1e-10)
    assert torch.allclose(tangent_projection(g, a, zero), g @ torch.linalg.pinv(a) @ a, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 9), inn=st.integers(2, 9), r=st.integers(1, 4), seed=st.integers(0, 2**16), b_zero=st.booleans())
def test_tangent_projection_is_an_orthogonal_projector(out, inn, r, seed, b_zero):
    g0 = gen(seed)
    g = torch.randn(out, inn, generator=g0, dtype=torch.float64)
    a = torch.randn(r, inn, generator=g0, dtype=torch.float64)
    b = torch.zeros(out, r, dtype=torch.float64) if b_zero else torch.randn(out, r, generator=g0, dtype=torch.float64)
    p = tangent_projection(g, a, b)
    assert torch.allclose(p, explicit_tangent(g, a, b), atol=1e-9)
    assert torch.allclose(tangent_projection(p, a, b), p, atol=1e-9)
    assert float(p.norm()) <= float(g.norm()) * (1 + 1e-12)


def lora_realization(module: nn.Module, rank: int, seed: int = 0) -> Realization:
    setting = Setting(PrecisionStack(), Subspace("lora", rank), OptimizerSpec())
    return Realization(setting, parameter_universe(module), param_dict(module), gen(seed))


def psi_of(real: Realization, grads: dict[str, torch.Tensor]) -> float:
    projected = real.project({k: grads[k] for k in real.trainable})
    captured = sum(float(v.double().square().sum()) for v in projected.values())
    total = sum(float(v.double().square().sum()) for v in grads.values())
    return math.sqrt(captured / total)


def test_lora_psi_is_one_when_row_a_holds_the_gradient_and_zero_when_orthogonal():
    torch.manual_seed(0)
    module = nn.Linear(16, 12, bias=False)
    real = lora_realization(module, rank=3)
    a = real.phi["weight::A"].detach()
    assert torch.count_nonzero(real.phi["weight::B"]) == 0  # PEFT init: B = 0
    g0 = gen(5)
    # row(G) inside row(A): G = Y A
    g_in = torch.randn(12, 3, generator=g0) @ a
    assert psi_of(real, {"weight": g_in}) == pytest.approx(1.0, abs=1e-6)
    # row(G) orthogonal to row(A) (and B = 0): nothing is captured
    q, _ = torch.linalg.qr(torch.cat([a.T, torch.randn(16, 13, generator=g0)], dim=1).double())
    ortho_rows = q[:, 3:].T.float()  # 13 x 16, orthogonal to row(A)
    g_out = torch.randn(12, 13, generator=g0) @ ortho_rows
    assert psi_of(real, {"weight": g_out}) == pytest.approx(0.0, abs=1e-5)


def test_lora_realization_projection_matches_explicit_formula_with_nonzero_b():
    torch.manual_seed(0)
    module = nn.Linear(10, 8, bias=False)
    real = lora_realization(module, rank=2)
    with torch.no_grad():
        real.phi["weight::B"].copy_(torch.randn(8, 2, generator=gen(3)))
    a, b = real.phi["weight::A"].detach(), real.phi["weight::B"].detach()
    g = torch.randn(8, 10, generator=gen(4))
    p = real.project({"weight": g})["weight"]
    assert torch.allclose(p.double(), explicit_tangent(g, a, b), atol=1e-5)
    assert torch.allclose(real.project({"weight": p})["weight"], p, atol=1e-5)


def test_lora_counts_non_targets_in_the_norm_but_not_in_the_capture():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    real = lora_realization(module, rank=8)  # A square, full rank: a target's own gradient is fully captured
    assert set(real.trainable) == {"0.weight", "1.weight"}
    grads = {name: torch.randn(p.shape, generator=gen(i)) for i, (name, p) in enumerate(module.named_parameters())}
    # A is square and full rank: P_A = I, so psi^2 = |targets|^2 / |all|^2
    expected = math.sqrt(sum(float(grads[k].square().sum()) for k in ("0.weight", "1.weight"))
                         / sum(float(g.square().sum()) for g in grads.values()))
    assert psi_of(real, grads) == pytest.approx(expected, rel=1e-5)
    assert psi_of(real, grads) < 1.0


def test_lora_scale_and_rank_pattern():
    sub = Subspace("lora", 8, alpha=16.0)
    assert sub.scale(8) == 2.0
    rs = Subspace("lora", 16, alpha=16.0, rslora=True)
    assert rs.scale(16) == pytest.approx(16 / 4)
    default = Subspace("lora", 4)
    assert default.scale(4) == 1.0  # alpha defaults to the rank
    pat = Subspace("lora", 4, rank_pattern=(("layers.0.q_proj", 32), (r".*\.v_proj", 16)))
    assert pat.rank_for("model.layers.0.q_proj") == 32  # suffix
    assert pat.rank_for("model.layers.1.v_proj") == 16  # regex
    assert pat.rank_for("model.layers.1.q_proj") == 4  # falls back to the rank


# ----------------------------------------------------------------------------- masks


def test_two_four_mask_keeps_the_two_largest_of_every_group_of_four():
    g0 = gen(6)
    w = torch.randn(6, 16, generator=g0)
    mask = two_four_mask(w)
    groups, kept = w.abs().reshape(-1, 4), mask.reshape(-1, 4)
    assert bool((kept.sum(1) == 2).all())
    for values, keep in zip(groups, kept, strict=True):
        assert float(values[keep].min()) >= float(values[~keep].max())
    with pytest.raises(UsageError, match="divisible by 4"):
        two_four_mask(torch.randn(4, 6))


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.25, 0.5, 0.7, 1.0])
def test_magnitude_mask_keeps_the_exact_fraction_of_largest_weights(keep):
    w = torch.randn(20, 10, generator=gen(7))
    mask = magnitude_mask(w, keep)
    k = round(keep * w.numel())
    assert int(mask.sum()) == k
    if 0 < k < w.numel():
        assert float(w.abs()[mask].min()) >= float(w.abs()[~mask].max())


def test_random_mask_keeps_the_exact_fraction_and_depends_only_on_the_seed():
    w = torch.randn(20, 10, generator=gen(8))
    m1, m2 = random_mask(w, 0.3, gen(1)), random_mask(w, 0.3, gen(1))
    assert int(m1.sum()) == 60
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, random_mask(w, 0.3, gen(2)))


def test_sparse_realization_starts_pruned_and_projects_onto_the_mask():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4))
    setting = Setting(PrecisionStack(), Subspace("sparse", sparsity=0.5, mask="2:4"), OptimizerSpec())
    real = Realization(setting, parameter_universe(module), param_dict(module), gen())
    assert set(real.masks) == {"0.weight", "1.weight"}  # all-linear: the head '1' is not named like one
    base = param_dict(module)
    for name, m in real.masks.items():
        phi = real.phi[name].detach()
        assert bool((phi[~m] == 0).all()) and torch.equal(phi[m], base[name][m])
        assert torch.equal(m, two_four_mask(base[name]))
        g = torch.randn(m.shape, generator=gen(9))
        assert torch.equal(real.project({k: (g if k == name else torch.zeros_like(real.phi[k])) for k in real.trainable})[name], g * m)
    assert "0.bias" in real.trainable  # other parameters train densely


# ----------------------------------------------------------------------------- Wilson interval


def test_wilson_interval_hand_computed():
    # 8/10 at 95%: p = 0.8, z = 1.96: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, n, p = 1.959963984540054, 10, 0.8
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook value
    assert lo < 0.8 < hi
    assert wilson_interval(0, 0) == (0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5000), data=st.data())
def test_wilson_interval_contains_p(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    if k == 0:
        assert lo == 0.0
    if k == n:
        assert hi == 1.0


def test_wilson_interval_edges_contain_p_exactly():
    # rounding used to leave p = 1 above hi (10/10) and p = 0 below lo (0/3)
    for n in range(1, 200):
        assert wilson_interval(n, n)[1] == 1.0
        assert wilson_interval(0, n)[0] == 0.0


def test_excludes_half():
    assert excludes_half(16, 16) and excludes_half(0, 16)
    assert not excludes_half(8, 16)


# ----------------------------------------------------------------------------- settings, plans, PEFT


def test_rank_and_precision_lists_make_the_grid():
    spec = from_mapping(SweepSpec(), {"rank": "4,16", "precision": "bf16,fp8_e4m3"}, "test")
    settings_ = spec.settings()
    assert len(settings_) == 4
    assert len({s.id for s in settings_}) == 4
    assert {(s.precision.weights, s.subspace.rank) for s in settings_} == {
        ("bf16", 4), ("bf16", 16), ("fp8_e4m3", 4), ("fp8_e4m3", 16)}
    assert all(s.subspace.kind == "lora" for s in settings_)


def test_setting_ids_distinguish_every_axis():
    spec = SweepSpec(precision=["bf16"], act_precision=[None, "fp8_e4m3"], rounding=["nearest", "stochastic"],
                     master_weights=["fp32", "none"], rank=[0, 8], lr=[1e-4, 1e-3], optimizer=["adamw", "sgd"])
    settings_ = spec.settings()
    assert len(settings_) == 2 * 2 * 2 * 2 * 2 * 2
    assert len({s.id for s in settings_}) == len(settings_)


def test_parse_rank_and_sparsity():
    assert parse_rank("full") == 0 and parse_rank("0") == 0 and parse_rank(" 16 ") == 16
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(UsageError):
            parse_rank(bad)
    assert parse_sparsity("2:4") == (0.5, "2:4")
    assert parse_sparsity("0.5") == (0.5, "magnitude")
    assert parse_sparsity("0.3:random") == (0.3, "random")
    assert parse_sparsity("none") == (0.0, "magnitude")
    for bad in ("1.0", "0.5:bogus", "abc", "0.25:2:4"):
        with pytest.raises(UsageError):
            parse_sparsity(bad)


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"rank": [4], "sparsity": ["0.5"]}, "cannot be combined"),
        ({"rounding": ["floor"]}, "rounding"),
        ({"master_weights": ["fp16"]}, "master_weights"),
        ({"optimizer": ["lion"]}, "optimizer"),
        ({"lr": [0.0]}, "lr"),
        ({"precision": ["fp7"]}, "fp7"),
    ],
)
def test_bad_sweeps_are_usage_errors(mapping, match):
    with pytest.raises(UsageError, match=match):
        from_mapping(SweepSpec(), mapping, "test").settings()


def test_unknown_plan_key_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown plan key"):
        from_mapping(SweepSpec(), {"rnak": 4}, "plan.yaml")


def test_plan_yaml_gives_the_expected_subspace(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "precision: [bf16]\nrank: 8\ntargets: attention\nalpha: 32\nrslora: true\n"
        "rank_pattern: {q_proj: 16}\nlr: [1.0e-3]\noptimizer: sgd\nsteps: 3\n"
    )
    data = load_plan(plan)
    (s,) = from_mapping(SweepSpec(), data, str(plan)).settings()
    assert s.subspace == Subspace("lora", 8, "attention", 32.0, True, (("q_proj", 16),))
    assert s.precision == PrecisionStack("bf16")
    assert s.optimizer.kind == "sgd" and s.optimizer.lr == 1e-3
    assert data["steps"] == 3


def test_malformed_plan_yaml_names_the_file_and_line(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("rank: [4, 8\nprecision: bf16\n")
    with pytest.raises(UsageError, match=r"plan\.yaml:\d+: malformed plan YAML"):
        load_plan(plan)
    plan.write_text("- just\n- a list\n")
    with pytest.raises(UsageError, match="mapping"):
        load_plan(plan)


def llama_params():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)
    return parameter_universe(LlamaForCausalLM(cfg))


def test_peft_adapter_config_gives_the_expected_subspace(tmp_path):
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "lora_alpha": 16,
        "use_rslora": True, "rank_pattern": {"model.layers.0.self_attn.q_proj": 32},
    }))
    (s,) = apply_peft_config(SweepSpec(precision=["bf16"]), cfg).settings()
    sub = s.subspace
    assert (sub.kind, sub.rank, sub.alpha, sub.rslora) == ("lora", 8, 16.0, True)
    assert sub.rank_pattern == (("model.layers.0.self_attn.q_proj", 32),)
    assert sub.scale(8) == pytest.approx(16 / math.sqrt(8))
    chosen = {p.layer for p in select_targets(llama_params(), sub.targets)}
    assert chosen == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert sub.rank_for("model.layers.0.self_attn.q_proj") == 32
    assert sub.rank_for("model.layers.1.self_attn.q_proj") == 8


def test_peft_config_errors(tmp_path):
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"peft_type": "IA3", "r": 8}))
    with pytest.raises(UsageError, match="IA3"):
        apply_peft_config(SweepSpec(), cfg)
    cfg.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(UsageError, match="no 'r'"):
        apply_peft_config(SweepSpec(), cfg)
    cfg.write_text("{not json")
    with pytest.raises(UsageError, match="adapter_config"):
        apply_peft_config(SweepSpec(), cfg)


def test_target_presets_on_a_llama():
    params = llama_params()
    attn = {p.layer.rsplit(".", 1)[-1] for p in select_targets(params, "attention")}
    mlp = {p.layer.rsplit(".", 1)[-1] for p in select_targets(params, "mlp")}
    every = {p.layer for p in select_targets(params, "all-linear")}
    assert attn == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert mlp == {"gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in every and len(every) == 2 * 7
    with pytest.raises(UsageError, match="matches no linear layer"):
        select_targets(params, "nothing_here")
    with pytest.raises(UsageError, match="not a valid regular expression"):
        select_targets(params, "([")


def test_uniform_proposal_noise_lies_in_the_subspace():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 8))
    sparse = Realization(Setting(PrecisionStack(), Subspace("sparse", sparsity=0.5, mask="2:4"), OptimizerSpec()),
                         parameter_universe(module), param_dict(module), gen())
    z = sparse.gaussian(gen(1))
    for name, m in sparse.masks.items():
        assert bool((z[name][~m] == 0).all()) and bool((z[name][m] != 0).all())
    lora = lora_realization(module, rank=2)
    with torch.no_grad():
        for key in lora.adapter_keys():
            if key.endswith("::B"):
                lora.phi[key].copy_(torch.randn(lora.phi[key].shape, generator=gen(2)))
    z = lora.gaussian(gen(3))
    again = lora.project(z)
    for name in lora.trainable:
        assert torch.allclose(again[name], z[name], atol=1e-5)
        assert float(z[name].norm()) > 0


@pytest.mark.parametrize("b_is_zero", [True, False])
def test_lora_gaussian_in_s_has_the_distribution_of_a_projected_gaussian(b_is_zero):
    """The direct sampler (r x r + r x in + out x r numbers) against its definition,
    P_S z for z ~ N(0, I) in W space: both have covariance P_S (as a matrix on
    vec(W)), and E||x||^2 = dim S = r (out + in) - r^2 (r out at B = 0)."""
    torch.manual_seed(0)
    module = nn.Linear(5, 6, bias=False)
    real = lora_realization(module, rank=2)
    name = real.trainable[0]
    if not b_is_zero:
        with torch.no_grad():
            real.phi[name + "::B"].copy_(torch.randn(6, 2, generator=gen(4)))
        real._bases.clear()
    n_w = 30
    basis = torch.eye(n_w).view(n_w, 6, 5)
    p_s = torch.stack([real.project({name: e})[name].flatten() for e in basis], 1).double()  # 30 x 30
    g = gen(7)
    draws = torch.stack([real.gaussian(g)[name].flatten() for _ in range(20_000)]).double()
    cov = draws.T @ draws / draws.shape[0]
    assert float((cov - p_s).abs().max()) < 0.06  # entries have SE ~ 1/sqrt(20000) = 0.007
    # every draw lies in S exactly (up to float32 rounding)
    for x in draws[:50]:
        assert torch.allclose((p_s @ x), x, atol=1e-5)
    dim_s = 2 * 6 if b_is_zero else 2 * (6 + 5) - 2 * 2
    assert round(float(torch.trace(p_s))) == dim_s
    sq = draws.square().sum(1)
    assert abs(float(sq.mean()) - dim_s) < 4 * float(sq.std()) / draws.shape[0] ** 0.5


@pytest.mark.parametrize(("fmt_name", "grow"), [("int8", 1.02), ("int4", 1.02), ("nf4", 1.02), ("nvfp4", 1.5)])
def test_a_rescale_alone_is_not_a_boundary_crossing(fmt_name, grow):
    """Growing a row's absmax moves every lattice point of a scaled format a little;
    beta counts weights that left their cell on the lattice they were on."""
    from hallway_audit.lattice import get_format
    from hallway_audit.probe.crossing import cell_changes

    fmt = get_format(fmt_name)
    before = torch.randn(4, 256, generator=gen(3))
    after = before.clone()
    i = int(before[0].abs().argmax())
    after[0, i] *= grow  # one weight moves; the row's (block's) scale moves with it
    requantized = int(torch.count_nonzero(fmt.at(after).quantize(after) != fmt.at(before).quantize(before)))
    assert requantized > 1  # comparing re-quantized values would count the rescale everywhere
    assert cell_changes(fmt, before, after) <= 1
    assert cell_changes(fmt, before, before) == 0
