"""Property tests (hypothesis): idempotence, monotonicity, error bound, unbiased SR."""

from __future__ import annotations

import math
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hallway_audit.lattice import get_format

PLAIN = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]
SCALED = ["int8", "int4", "nf4", "mxfp8", "mxfp6", "mxfp4", "nvfp4"]
POW2_SCALE = {"mxfp8", "mxfp6", "mxfp4"}  # x / scale and element * scale exact

f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
FEW = settings(max_examples=int(os.environ.get("LATTICE_EXAMPLES", "40")), deadline=None)  # modest by default


def vec(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("name", PLAIN + SCALED)
@FEW
@given(xs=st.lists(f32, min_size=1, max_size=80))
def test_idempotent(name, xs):
    x = vec(xs)
    lat = get_format(name).at(x)
    q = lat.quantize(x)
    assert torch.equal(lat.quantize(q), q)
    assert torch.equal(lat.quantize(q, "stochastic", torch.Generator().manual_seed(1)), q)
    assert torch.equal(lat.cell_id(q), lat.cell_id(x))


@pytest.mark.parametrize("name", PLAIN)
@FEW
@given(xs=st.lists(st.floats(width=32, allow_nan=False), min_size=2, max_size=80))
def test_monotone(name, xs):
    x = torch.sort(vec(xs)).values
    fmt = get_format(name)
    q, c = fmt.quantize(x), fmt.cell_id(x)
    assert torch.all(q[1:] >= q[:-1]) and torch.all(c[1:] >= c[:-1])


@pytest.mark.parametrize("name", PLAIN + SCALED)
@FEW
@given(xs=st.lists(f32, min_size=1, max_size=80), data=st.data())
def test_error_at_most_half_ulp(name, xs, data):
    """|q(x) - x| <= ulp(x)/2 for x within range. Exact for floats and MX; for
    non-power-of-two scales (int, nf4, nvfp4) the fp32 rounding of scale*level and
    bitsandbytes' float32 thresholds allow 2^-20 relative slack."""
    ref = vec(xs)
    lat = get_format(name).at(ref)
    # probe points inside the lattice's range, drawn relative to the max at each position
    frac = vec(data.draw(st.lists(st.floats(-1, 1, width=32), min_size=len(xs), max_size=len(xs))))
    x = frac * lat.max_abs(ref)
    err = (lat.quantize(x).double() - x.double()).abs()
    bound = lat.ulp(x).double() / 2
    slack = 0.0 if (name in PLAIN or name in POW2_SCALE) else 2.0**-20 * x.double().abs()
    assert torch.all(err <= bound + slack)


SMALL_DT = {
    "bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2, "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def signed_table(name: str) -> np.ndarray:
    """Every finite value of the format, sorted, from ml_dtypes' bit patterns."""
    n = 65536 if name in ("bf16", "fp16") else 256
    store = np.uint16 if n == 65536 else np.uint8
    width = {"fp6_e3m2": 64, "fp6_e2m3": 64, "fp4_e2m1": 16}.get(name, n)
    with np.errstate(invalid="ignore"):
        v = np.arange(width, dtype=np.int64).astype(store).view(SMALL_DT[name]).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


@pytest.mark.parametrize("name", list(SMALL_DT))
@FEW
@given(xs=st.lists(f32, min_size=1, max_size=60), seed=st.integers(0, 2**31))
def test_stochastic_is_one_of_the_two_table_neighbours(name, xs, seed):
    tab = signed_table(name)
    x = vec(xs)
    x = x[x.abs() <= tab[-1]]  # beyond max: saturation, tested elsewhere
    sr = get_format(name).quantize(x, "stochastic", torch.Generator().manual_seed(seed)).double().numpy()
    xd = x.double().numpy()
    lo = tab[np.searchsorted(tab, xd, side="right") - 1]  # largest table value <= x
    hi = tab[np.searchsorted(tab, xd, side="left")]  # smallest table value >= x
    assert np.all((sr == lo) | (sr == hi))


@pytest.mark.parametrize("name", SCALED)
@FEW
@given(xs=st.lists(f32, min_size=1, max_size=60), seed=st.integers(0, 2**31))
def test_stochastic_scaled_lands_on_a_neighbouring_cell(name, xs, seed):
    x = vec(xs)
    lat = get_format(name).at(x)
    sr = lat.quantize(x, "stochastic", torch.Generator().manual_seed(seed))
    assert torch.equal(lat.quantize(sr), sr)  # on the lattice
    assert torch.all((lat.cell_id(sr) - lat.cell_id(x)).abs() <= 1)  # nearest's cell or the next
    slack = (0.0 if name in POW2_SCALE else 2.0**-20) * x.double().abs()
    inside = x.abs() <= lat.max_abs(x)  # beyond: saturated to the max, tested elsewhere
    dist = (sr.double() - x.double()).abs()
    assert torch.all((dist <= lat.ulp(x).double() + slack)[inside])  # within x's cell


SR_CASES = [  # (format, reference fill (sets the scale), value to round)
    ("bf16", 1.0, 1.0 + 2.0**-9), ("fp16", 1.0, 3.14159), ("fp8_e4m3", 1.0, 0.3),
    ("fp8_e4m3", 1.0, 0.0041), ("fp8_e5m2", 1.0, -1234.5), ("fp6_e3m2", 1.0, 0.1),
    ("fp6_e2m3", 1.0, -2.2), ("fp4_e2m1", 1.0, 4.7), ("int8", 12.7, 0.1234),
    ("int4", 7.0, -3.3), ("nf4", 1.0, 0.2), ("mxfp8", 1.0, 0.3), ("mxfp6", 1.0, -0.61),
    ("mxfp4", 1.0, 0.13), ("nvfp4", 1.0, 0.37),
]  # fp32: every fp32 input is on the lattice, nothing to round


@pytest.mark.parametrize(("name", "fill", "value"), SR_CASES)
def test_stochastic_rounding_is_unbiased(name, fill, value):
    """Mean of N = 20000 SR samples within 5 standard errors of x.

    SE = gap * sqrt(p (1 - p) / N), p = (x - lo) / gap; a false alarm has
    probability ~6e-7 per case, and the seed is fixed anyway.
    """
    n = 20000
    lat = get_format(name).at(torch.full((n,), fill))  # every group's absmax is `fill`
    x = torch.full((n,), value)
    sr = lat.quantize(x, "stochastic", torch.Generator().manual_seed(1234)).double()
    v = float(x[0])
    vals = torch.unique(sr)
    assert 1 <= len(vals) <= 2
    lo_, hi_ = float(vals.min()), float(vals.max())
    assert lo_ < v < hi_, "pick an off-lattice value that both neighbours get drawn for"
    gap = hi_ - lo_
    p = (v - lo_) / gap
    se = gap * math.sqrt(p * (1 - p) / sr.numel())
    assert abs(float(sr.mean()) - v) <= 5 * se


@pytest.mark.parametrize("name", PLAIN + SCALED)
def test_stochastic_leaves_lattice_points_alone(name):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    lat = get_format(name).at(x)
    q = lat.quantize(x)
    for seed in range(5):
        assert torch.equal(lat.quantize(q, "stochastic", torch.Generator().manual_seed(seed)), q)


def test_stochastic_uses_the_generator():
    x = torch.rand(1000) * 3
    fmt = get_format("fp4_e2m1")
    a = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(5))
    b = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(5))
    c = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_saturates_and_keeps_nan():
    x = vec([1e6, -1e6, float("inf"), float("nan"), 450.0])
    sr = get_format("fp8_e4m3").quantize(x, "stochastic", torch.Generator().manual_seed(0))
    assert sr[:3].tolist() == [448.0, -448.0, 448.0] and math.isnan(sr[3]) and sr[4] == 448.0


def test_stochastic_keeps_sign_of_zero():
    x = torch.full((2000,), -1e-9)
    sr = get_format("bf16").quantize(x, "stochastic", torch.Generator().manual_seed(0))
    assert np.all(np.signbit(sr.numpy()))
