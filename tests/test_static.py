"""The static audit's figures, checked against direct computation with ml_dtypes."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import tiny_mlp_state, write_safetensors

from hallway_audit.checkpoint import open_checkpoint
from hallway_audit.cli import main
from hallway_audit.lattice import get_format
from hallway_audit.static import run_static, spectral_figures
from hallway_audit.static.measure import measure_tensor
from hallway_audit.static.tally import HIST_PER_OCTAVE, histogram_median, log2_histogram


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def test_beta_pred_counts_weights_whose_half_ulp_is_below_lr():
    # bf16: ulp(1.0) = 2^-7, ulp(2^-10) = 2^-17. At lr 1e-4, 2^-8 > lr: 1.0 is stuck,
    # 2^-17 / 2 < lr: 2^-10 moves. Zero's ulp is the smallest subnormal: it moves.
    w = torch.tensor([1.0, 1.5, 2.0**-10, 0.0, -(2.0**-10)])
    t = measure_tensor(w, {"bf16": get_format("bf16")}, lr=1e-4)
    assert t.formats["bf16"].movable == 3
    assert t.formats["bf16"].summary()["beta_pred"] == pytest.approx(3 / 5)
    # At lr = exactly ulp(1.0)/2 the step does not exceed half an ulp: still stuck.
    t = measure_tensor(torch.tensor([1.0]), {"bf16": get_format("bf16")}, lr=2.0**-8)
    assert t.formats["bf16"].movable == 0


def test_relative_error_and_sqnr_match_ml_dtypes_cast():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 64, generator=g) * 0.02
    t = measure_tensor(w, {"bf16": get_format("bf16")}, lr=1e-4).formats["bf16"].summary()
    x = w.numpy()
    want = np.linalg.norm((_bf16(x) - x).astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
    # float32 norms (pairwise summation): a few ulps of float32, far below 3 shown digits
    assert t["rel_error"] == pytest.approx(want, rel=1e-5)
    assert t["sqnr_db"] == pytest.approx(-20 * math.log10(want), rel=1e-6)


def test_saturation_and_flush_to_zero_in_fp8():
    w = torch.tensor([1000.0, -465.0, 464.0, 1e-9, 0.0, 1.0])
    s = measure_tensor(w, {"fp8_e4m3": get_format("fp8_e4m3")}, lr=1e-4).formats["fp8_e4m3"].summary()
    assert s["saturated"] == pytest.approx(2 / 6)  # beyond 464; 464 ties back to 448 (rounding, not the clamp)
    assert s["flushed"] == pytest.approx(1 / 5)  # 1e-9 of the five nonzero weights


def test_exact_format_has_zero_error_and_infinite_sqnr():
    s = measure_tensor(torch.randn(100), {"fp32": get_format("fp32")}, lr=1e-4).formats["fp32"].summary()
    assert s["rel_error"] == 0.0 and s["sqnr_db"] == math.inf


def test_nonfinite_weights_are_counted_and_left_out_of_format_figures():
    w = torch.tensor([float("nan"), float("inf"), 0.5, 0.0])
    t = measure_tensor(w, {"bf16": get_format("bf16")}, lr=1.0)
    assert t.nonfinite == 2 and t.zeros == 1 and t.params == 4
    s = t.formats["bf16"].summary()
    assert s["beta_pred"] == 1.0  # both finite weights move at lr 1; NaN/Inf not counted
    assert s["rel_error"] == 0.0 and s["saturated"] == 0.0


def test_histogram_median_is_within_its_stated_resolution():
    g = torch.Generator().manual_seed(0)
    r = torch.exp(torch.randn(100_001, generator=g) * 3)
    got = histogram_median(log2_histogram(r))
    exact = float(r.median())
    assert abs(math.log2(got) - math.log2(exact)) <= 1 / HIST_PER_OCTAVE


def test_run_static_groups_layers_and_tallies_add_up(tmp_path):
    state = tiny_mlp_state()
    state["step"] = torch.tensor([7], dtype=torch.int64)
    path = write_safetensors(tmp_path / "m.safetensors", state)
    with open_checkpoint(path) as ckpt:
        res = run_static(ckpt, ["bf16", "fp8_e4m3"], lr=1e-4)
    names = [layer.name for layer in res.layers]
    assert names == sorted(names, key=names.index)  # checkpoint order kept
    assert set(names) == {"net.0", "norm", "net.2"}
    assert res.layer("net.0").tally.params == 64 * 32 + 64
    assert [n for n, _ in res.skipped] == ["step"]
    assert res.model.params == sum(layer.tally.params for layer in res.layers)
    for fmt in ("bf16", "fp8_e4m3"):
        assert res.model.formats[fmt].movable == sum(layer.tally.formats[fmt].movable for layer in res.layers)
    # RMSNorm weights of exactly 1.0 cannot move in bf16 at lr 1e-4 (half ulp = 2^-8).
    assert res.layer("norm").format_metrics("bf16")["beta_pred"] == 0.0


def test_bf16_stored_checkpoint_is_exact_in_bf16(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in tiny_mlp_state().items()}
    path = write_safetensors(tmp_path / "b.safetensors", state)
    with open_checkpoint(path) as ckpt:
        res = run_static(ckpt, ["bf16"], lr=1e-4)
    assert res.model.formats["bf16"].summary()["rel_error"] == 0.0
    assert res.layers[0].tensors[0].dtype == "bfloat16"


def test_spectral_figures_of_known_matrices():
    rank1 = torch.outer(torch.arange(1.0, 5.0), torch.ones(3))
    s = spectral_figures(rank1)
    assert s["stable_rank"] == pytest.approx(1.0) and s["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(6)
    s = spectral_figures(eye)
    assert s["stable_rank"] == pytest.approx(6.0) and s["effective_rank"] == pytest.approx(6.0)
    assert spectral_figures(torch.ones(5))["stable_rank"] is None


def test_spectral_is_opt_in(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", tiny_mlp_state())
    with open_checkpoint(path) as ckpt:
        off = run_static(ckpt, ["bf16"], lr=1e-4)
        on = run_static(ckpt, ["bf16"], lr=1e-4, spectral=True)
    assert off.layer("net.0").spectral is None
    assert 1.0 <= on.layer("net.0").spectral["stable_rank"] <= 32
    assert on.layer("norm").spectral == {"stable_rank": None, "effective_rank": None}


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"])
def test_movable_threshold_equals_the_per_weight_ulp_test(name):
    """The static fast path (one compare against a binade threshold) counts exactly
    the weights with ulp(w) < 2 lr, for values across every binade, zero, subnormals,
    max finite and beyond, and lrs on and off half-ulp boundaries."""
    from hallway_audit.static.measure import movable_below

    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(50_000, generator=g) * 2 - 1) * torch.exp2(torch.randint(-149, 127, (50_000,), generator=g).float())
    edges = [0.0, -0.0, 2.0**-149, 2.0**-126, fmt.max_finite, fmt.max_finite * 1.001, 3e38]
    x = torch.cat([x, torch.tensor(edges, dtype=torch.float32)])
    for lr in (1e-30, 1e-8, 1e-5, 1e-4, 2.0**-8, 2.0**-9, 1e-2, 0.5, 10.0, 1e6, 1e30):
        fast = x.abs() < movable_below(fmt, lr)
        assert torch.equal(fast, fmt.ulp(x) < 2 * lr), lr


PLAIN = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]


def _edge_tensor(dtype: torch.dtype, n: int = 70_000) -> torch.Tensor:
    """Random weights across many binades plus every named edge case of `dtype`."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 12, (n,), generator=g).float())
    fi = torch.finfo(dtype)
    edges = [0.0, -0.0, fi.tiny, fi.smallest_normal / 4, -fi.tiny, fi.max, -fi.max, 448.0, 449.0, 464.0,
             2.0**-10, 2.0**-9, 3 * 2.0**-11, 1.0 + 2.0**-4, 1.0 + 3 * 2.0**-4, float("nan"), float("inf"), float("-inf")]
    return torch.cat([x, torch.tensor(edges)]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lr", [1e-5, 2.0**-8, 1.0])
def test_bit_pattern_path_equals_element_by_element(dtype, lr):
    """The 16-bit fast path (count each bit pattern once, quantize 65536 values) gives
    the same counts and the same histogram as quantizing every element, for zero,
    -0, subnormals, max finite, beyond fp8's range, ties, NaN and +-inf."""
    from hallway_audit.static import measure

    w = _edge_tensor(dtype)
    fmts = {n: get_format(n) for n in PLAIN}
    old = measure.HIST_SAMPLE
    measure.HIST_SAMPLE = w.numel()  # the element path histograms every weight too
    try:
        fast = measure_tensor(w, fmts, lr, by_pattern=True)
        slow = measure_tensor(w, fmts, lr, by_pattern=False)
    finally:
        measure.HIST_SAMPLE = old
    assert (fast.params, fast.nonfinite, fast.zeros) == (slow.params, slow.nonfinite, slow.zeros)
    assert fast.nonfinite == 3 and fast.zeros >= 2
    for name in PLAIN:
        a, b = fast.formats[name], slow.formats[name]
        assert (a.n, a.nonzero, a.saturated, a.flushed, a.movable) == (b.n, b.nonzero, b.saturated, b.flushed, b.movable), name
        assert a.signal_sq == pytest.approx(b.signal_sq, rel=1e-5)
        assert a.error_sq == pytest.approx(b.error_sq, rel=1e-5, abs=1e-30), name
        assert torch.equal(a.ulp_rel_hist, b.ulp_rel_hist), name


@pytest.mark.parametrize("lr", [1e-5, 1.0])
def test_float32_holding_bf16_values_is_tallied_by_pattern_with_the_same_figures(lr, monkeypatch):
    """bf16 weights saved upcast to float32 (low 16 bits zero) take the pattern path;
    one float32 weight off the bf16 lattice sends the tensor down the element path."""
    from hallway_audit.static import measure

    w = _edge_tensor(torch.bfloat16).float()
    fmts = {n: get_format(n) for n in PLAIN}
    monkeypatch.setattr(measure, "HIST_SAMPLE", w.numel())
    counted = []
    real_counts = measure.pattern_counts
    monkeypatch.setattr(measure, "pattern_counts", lambda flat: counted.append(flat.dtype) or real_counts(flat))
    fast = measure_tensor(w, fmts, lr, by_pattern=True)
    slow = measure_tensor(w, fmts, lr, by_pattern=False)
    assert counted == [torch.float32]
    assert (fast.nonfinite, fast.zeros) == (slow.nonfinite, slow.zeros)
    for name in PLAIN:
        a, b = fast.formats[name], slow.formats[name]
        assert (a.n, a.saturated, a.flushed, a.movable) == (b.n, b.saturated, b.flushed, b.movable), name
        assert a.error_sq == pytest.approx(b.error_sq, rel=1e-5, abs=1e-30), name
        assert torch.equal(a.ulp_rel_hist, b.ulp_rel_hist), name
    off = w.clone()
    off[-100] = float(off[-100]) * (1 + 2.0**-20)  # no longer a bf16 value
    measure_tensor(off, fmts, lr, by_pattern=True)
    assert counted == [torch.float32]  # not counted by pattern


def test_bit_pattern_path_is_taken_for_large_16_bit_tensors_and_scaled_formats_still_measured():
    from hallway_audit.static import measure

    w = _edge_tensor(torch.bfloat16)
    assert w.numel() >= measure.PATTERN_MIN
    fmts = {"fp8_e4m3": get_format("fp8_e4m3"), "int8": get_format("int8")}
    auto = measure_tensor(w, fmts, 1e-4)
    forced = measure_tensor(w, fmts, 1e-4, by_pattern=True)
    assert auto.formats["fp8_e4m3"].error_sq == forced.formats["fp8_e4m3"].error_sq
    assert auto.formats["int8"].n == w.numel() - 3 and auto.formats["int8"].error_sq > 0


@pytest.mark.parametrize(
    ("name", "dtype", "holds"),
    [("fp32", torch.float32, True), ("bf16", torch.float32, False), ("bf16", torch.bfloat16, True),
     ("fp32", torch.bfloat16, True), ("fp16", torch.bfloat16, False), ("bf16", torch.float16, False),
     ("fp16", torch.float16, True), ("fp8_e4m3", torch.float8_e4m3fn, True), ("bf16", torch.float8_e5m2, True),
     ("fp8_e4m3", torch.float8_e5m2, False), ("int8", torch.bfloat16, False)],
)
def test_holds_every_value_by_enumeration(name, dtype, holds):
    from hallway_audit.static.measure import holds_every_value

    assert holds_every_value(get_format(name), dtype) is holds


def test_a_format_that_holds_the_stored_dtype_reports_no_loss():
    w = _edge_tensor(torch.bfloat16)
    t = measure_tensor(w, {"bf16": get_format("bf16"), "fp32": get_format("fp32")}, 1e-4, by_pattern=False)
    for name in ("bf16", "fp32"):
        f = t.formats[name]
        assert f.error_sq == 0.0 and f.flushed == 0 and f.saturated == 0


def test_saturation_is_a_range_warning_in_plain_formats_and_an_info_under_mx(tmp_path, capsys):
    """The bundled rules on one checkpoint with outliers: fp8_e4m3 (plain) warns
    `saturated-weights`; mxfp8 clamps only block maxima (`block-maxima-clamp`, info);
    int4 scales each group from its own amax and saturates nothing."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[0, :8] = 1000.0  # beyond fp8_e4m3's 464 in the plain format
    path = write_safetensors(tmp_path / "m.safetensors", {"layer.weight": w})
    code = main([str(path), "--precision", "fp8_e4m3,mxfp8,int4", "-q", "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    found = {(f["rule"], f["setting"]) for f in doc["findings"] if f.get("layer") == "layer"}
    assert ("saturated-weights", "fp8_e4m3") in found
    assert ("block-maxima-clamp", "mxfp8") in found and ("saturated-weights", "mxfp8") not in found
    assert not {rule for rule, fmt in found if fmt == "int4"} & {"saturated-weights", "block-maxima-clamp"}
    info = next(f for f in doc["findings"] if f["rule"] == "block-maxima-clamp")
    assert info["severity"] == "info"
