"""Plain float formats against ml_dtypes, bit pattern by bit pattern.

The oracle is ml_dtypes' numpy casts (round-to-nearest-even) and tables built by
enumerating every bit pattern of each format -- never our own formulas.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from hallway_audit.lattice import NAN_CELL, get_format

SMALL = {  # format -> (ml_dtypes type, storage dtype, number of bit patterns)
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, np.uint8, 256),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, np.uint8, 256),
    "fp6_e3m2": (ml_dtypes.float6_e3m2fn, np.uint8, 64),
    "fp6_e2m3": (ml_dtypes.float6_e2m3fn, np.uint8, 64),
    "fp4_e2m1": (ml_dtypes.float4_e2m1fn, np.uint8, 16),
    "bf16": (ml_dtypes.bfloat16, np.uint16, 65536),
    "fp16": (np.float16, np.uint16, 65536),
}
FLOATS = list(SMALL)
FINFO = {name: ml_dtypes.finfo(dt) for name, (dt, _, _) in SMALL.items()}
FINFO["fp32"] = np.finfo(np.float32)


def all_values(name: str) -> np.ndarray:
    """Every bit pattern of the format, decoded by ml_dtypes, as float32."""
    dt, store, n = SMALL[name]
    return np.arange(n, dtype=np.int64).astype(store).view(dt).astype(np.float32)


def table(name: str) -> np.ndarray:
    """Sorted distinct finite non-negative values (-0 and +0 are one entry)."""
    v = all_values(name)
    return np.unique(np.abs(v[np.isfinite(v)]))


def cast(name: str, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(SMALL[name][0]).astype(np.float32)


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, equal signs of zero, NaN exactly where NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


# --------------------------------------------------------------------------- enumeration


@pytest.mark.parametrize("name", FLOATS)
def test_every_representable_value_is_fixed(name):
    v = all_values(name)
    v = v[np.isfinite(v)]
    q = get_format(name).quantize(t(v)).numpy()
    assert same_bits(q, v)  # -0.0 stays -0.0


@pytest.mark.parametrize("name", FLOATS)
def test_every_midpoint_rounds_like_ml_dtypes(name):
    pos = table(name)
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)
    assert np.all((mids.astype(np.float64) * 2) == (pos[:-1].astype(np.float64) + pos[1:]))  # exact
    x = np.concatenate([mids, -mids])
    q = get_format(name).quantize(t(x)).numpy()
    assert same_bits(q, cast(name, x))


@pytest.mark.parametrize("name", FLOATS)
def test_quarter_points_round_like_ml_dtypes(name):
    pos = table(name).astype(np.float64)
    x = np.concatenate([pos[:-1] + (pos[1:] - pos[:-1]) * k / 4 for k in (1, 3)]).astype(np.float32)
    x = np.concatenate([x, -x])
    assert same_bits(get_format(name).quantize(t(x)).numpy(), cast(name, x))


@pytest.mark.parametrize("name", FLOATS)
def test_random_values_across_binades_match_ml_dtypes(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    fi = FINFO[name]
    lo, hi = np.log2(float(fi.smallest_subnormal)) - 3, np.log2(float(fi.max))
    mag = 2.0 ** rng.uniform(lo, hi, 20000)
    x = (mag * rng.choice([-1.0, 1.0], mag.size)).astype(np.float32)
    x = x[np.abs(x) <= np.float32(fi.max)]
    assert same_bits(get_format(name).quantize(t(x)).numpy(), cast(name, x))


@pytest.mark.parametrize("name", FLOATS)
def test_random_fp32_bit_patterns_match_ml_dtypes(name):
    """Uniform over fp32 bit patterns: every fp32 binade, fp32 subnormals included."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2**32, 50000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= np.float32(FINFO[name].max))]
    assert same_bits(get_format(name).quantize(t(x)).numpy(), cast(name, x))


@pytest.mark.parametrize("name", FLOATS)
def test_ulp_is_spacing_in_enumerated_table(name):
    pos = table(name)
    v, spacing = pos[:-1], pos[1:] - pos[:-1]  # positive v below max (and 0)
    fmt = get_format(name)
    assert np.array_equal(fmt.ulp(t(v)).numpy(), spacing)
    assert np.array_equal(fmt.ulp(t(-v)).numpy(), spacing)  # symmetric


@pytest.mark.parametrize("name", FLOATS)
def test_ulp_between_lattice_points_is_the_cell_width(name):
    pos = table(name).astype(np.float64)
    inside = ((pos[:-1] + pos[1:]) / 2).astype(np.float32)  # strictly between neighbours
    assert np.array_equal(get_format(name).ulp(t(inside)).numpy(), (pos[1:] - pos[:-1]).astype(np.float32))


@pytest.mark.parametrize("name", FLOATS)
def test_cell_id_is_rank_in_table(name):
    v = all_values(name)
    v = v[np.isfinite(v)]
    rank = np.searchsorted(table(name), np.abs(v))
    expected = np.where(v < 0, -rank, rank)
    assert np.array_equal(get_format(name).cell_id(t(v)).numpy(), expected)


@pytest.mark.parametrize("name", FLOATS)
def test_cell_id_of_random_values_is_rank_of_rounded_value(name):
    rng = np.random.default_rng(3)
    fi = FINFO[name]
    x = (rng.standard_normal(20000) * float(fi.max) / 8).astype(np.float32)
    x = x[np.abs(x) <= np.float32(fi.max)]
    r = cast(name, x)
    rank = np.searchsorted(table(name), np.abs(r))
    assert np.array_equal(get_format(name).cell_id(t(x)).numpy(), np.where(r < 0, -rank, rank))


@pytest.mark.parametrize("name", FLOATS)
def test_neighbouring_lattice_points_differ_by_one_cell(name):
    pos = table(name)
    signed = np.concatenate([-pos[::-1], pos[1:]])
    cid = get_format(name).cell_id(t(signed)).numpy()
    assert np.all(np.diff(cid) == 1)


# --------------------------------------------------------------------------- named edge cases


def edge_cases(name: str):
    """(id, input, expected quantize, expected ulp, expected cell_id) from finfo/tables."""
    fi = FINFO[name]
    sub, tiny, big = float(fi.smallest_subnormal), float(fi.smallest_normal), float(fi.max)
    if name == "fp32":  # too many values to enumerate: the ordinal is the bit pattern
        rank = lambda v: int(np.float32(v).view(np.int32))  # noqa: E731
        ulp_max = float(np.float32(big) - np.nextafter(np.float32(big), np.float32(0)))
    else:
        pos = table(name)
        rank = lambda v: int(np.searchsorted(pos, np.float32(v)))  # noqa: E731
        ulp_max = float(pos[-1] - pos[-2])  # spacing of the top binade (e4m3fn: 448 - 416)
    largest_sub = float(np.float32(tiny) - np.float32(sub))  # (2^mbits - 1) * sub
    inf, nan = float("inf"), float("nan")
    return [
        ("zero", 0.0, 0.0, sub, 0),
        ("neg_zero", -0.0, -0.0, sub, 0),
        ("smallest_subnormal", sub, sub, sub, 1),
        ("neg_smallest_subnormal", -sub, -sub, sub, -1),
        ("largest_subnormal", largest_sub, largest_sub, sub, rank(largest_sub)),
        ("smallest_normal", tiny, tiny, sub, rank(tiny)),
        ("max_finite", big, big, ulp_max, rank(big)),
        ("neg_max_finite", -big, -big, ulp_max, -rank(big)),
        # fp32 has nothing above max but inf: these come in as float64 (1e39 -> inf in fp32)
        ("just_above_max", big * (1 + 2.0**-40) if name == "fp32" else
         float(np.nextafter(np.float32(big), np.float32(inf))), big, ulp_max, rank(big)),
        ("far_above_max", 1e39 if big > 1e38 else 1e38, big, ulp_max, rank(big)),
        ("pos_inf", inf, big, ulp_max, rank(big)),
        ("neg_inf", -inf, -big, ulp_max, -rank(big)),
        ("half_smallest_subnormal", sub / 2, 0.0, sub, 0),  # tie -> even (0)
        ("neg_below_half_subnormal", -sub / 4, -0.0, sub, 0),  # sign kept on zero
        ("nan", nan, nan, nan, NAN_CELL),
    ]


EDGE = [(n, *c) for n in [*FLOATS, "fp32"] for c in edge_cases(n)]


@pytest.mark.parametrize(("name", "case", "x", "q", "ulp", "cid"), EDGE, ids=[f"{e[0]}-{e[1]}" for e in EDGE])
def test_edge_case(name, case, x, q, ulp, cid):
    fmt = get_format(name)
    xt = torch.tensor([x], dtype=torch.float64)  # exact: every x but fp32's beyond-max is an fp32
    assert same_bits(fmt.quantize(xt).numpy(), np.array([q], np.float32)), case
    sr = fmt.quantize(xt, "stochastic", torch.Generator().manual_seed(0)).numpy()
    if "half" in case:  # off the lattice: either neighbour, sign kept
        assert sr[0] in (0.0, np.copysign(FINFO[name].smallest_subnormal, x)) and np.signbit(sr[0]) == np.signbit(x)
    else:  # on the lattice, saturated or NaN: deterministic
        assert same_bits(sr, np.array([q], np.float32)), case
    assert same_bits(fmt.ulp(xt).numpy(), np.array([ulp], np.float32)), case
    assert fmt.cell_id(xt).item() == cid, case
    if case != "nan":
        assert fmt.at(xt).max_abs(xt).item() == np.float32(FINFO[name].max)


def test_ml_dtypes_would_overflow_where_we_saturate():
    """Documented divergence: ml_dtypes casts overflow to inf/NaN, we saturate (docs/definitions.md §2.3)."""
    x = np.array([465.0, 1e6], np.float32)
    assert np.isnan(cast("fp8_e4m3", x)).all()
    assert get_format("fp8_e4m3").quantize(t(x)).tolist() == [448.0, 448.0]
    y = np.array([61440.0, 1e9], np.float32)  # 61440: tie between 57344 and 2^16 -> inf in IEEE
    assert np.isinf(cast("fp8_e5m2", y)).all()
    assert get_format("fp8_e5m2").quantize(t(y)).tolist() == [57344.0, 57344.0]


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "bf16"])
def test_saturated_is_exactly_where_ml_dtypes_overflows(name):
    """`saturated` = nearest rounding leaves the range: where ml_dtypes' (non-saturating)
    cast gives inf / NaN. Covers max itself, the half-step threshold T (IEEE: the tie
    overflows; e4m3fn: 464 ties back to 448), its fp32 neighbours, and far beyond."""
    top = np.float32(FINFO[name].max)
    bound, _ = get_format(name).grid.overflow_bound()
    T = np.float32(bound)
    x = np.array([top, np.nextafter(top, np.float32(np.inf)), np.nextafter(T, np.float32(0)), T,
                  np.nextafter(T, np.float32(np.inf)), min(float(top) * 1.5, 3e38), 3e38], np.float32)
    x = x[np.isfinite(x)]
    x = np.concatenate([x, -x])
    want = ~np.isfinite(cast(name, x))
    got = get_format(name).at(t(x)).saturated(t(x)).numpy()
    assert np.array_equal(got, want), (x, got, want)


@pytest.mark.parametrize("name, top, bound", [("fp4_e2m1", 6.0, 7.0), ("fp6_e2m3", 7.5, 7.75), ("fp6_e3m2", 28.0, 30.0)])
def test_saturated_in_all_finite_formats_ties_up(name, top, bound):
    """OCP fp6/fp4 have no inf/NaN (ml_dtypes saturates, so it cannot be the oracle): the
    next value would be 2^(emax+1), mantissa even, so the tie at T rounds past max."""
    fmt = get_format(name)
    assert fmt.max_finite == top and fmt.grid.overflow_bound() == (bound, True)
    x = t(np.array([top, np.nextafter(np.float32(bound), np.float32(0)), bound, -bound, bound * 2, 0.0]))
    assert fmt.at(x).saturated(x).tolist() == [False, False, True, True, True, False]
    assert fmt.quantize(x)[:4].abs().tolist() == [top] * 4  # the clamp is what saturation means


# --------------------------------------------------------------------------- fp32 itself


def test_fp32_random_bit_patterns_identity_ulp_and_ordinal():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 2**32, 100000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x[np.isfinite(x)], np.array([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38], np.float32)])
    fmt = get_format("fp32")
    assert same_bits(fmt.quantize(t(x)).numpy(), x)
    bits = np.abs(x).view(np.int32).astype(np.int64)
    assert np.array_equal(fmt.cell_id(t(x)).numpy(), np.where(np.signbit(x), -bits, bits))
    pos = np.abs(x)
    pos = pos[pos < np.finfo(np.float32).max]
    assert np.array_equal(fmt.ulp(t(pos)).numpy(), np.spacing(pos))


def test_fp32_subnormals_are_exact():
    n = np.arange(1, 1 << 23, 4099, dtype=np.uint32)  # subnormal bit patterns
    x = n.view(np.float32)
    fmt = get_format("fp32")
    assert same_bits(fmt.quantize(t(x)).numpy(), x)
    assert np.all(fmt.ulp(t(x)).numpy() == np.float32(2.0**-149))
    assert np.array_equal(fmt.cell_id(t(x)).numpy(), n.astype(np.int64))
    assert np.array_equal(fmt.cell_id(t(-x)).numpy(), -n.astype(np.int64))


def test_fp64_input_is_rounded_to_fp32_first():
    x = torch.tensor([1.0 + 2.0**-30, 1e-50, 1e300], dtype=torch.float64)
    q = get_format("fp32").quantize(x)
    assert q.dtype == torch.float32
    assert q.tolist() == [1.0, 0.0, float(np.finfo(np.float32).max)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", FLOATS)
def test_low_precision_inputs_convert_exactly(name, dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(dtype)
    fmt = get_format(name)
    q = fmt.quantize(x)
    assert q.dtype == torch.float32 and q.shape == x.shape
    assert same_bits(q.numpy(), cast(name, x.float().numpy()))


def _pairs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) pairs over the named edge cases: zero and negative zero, subnormals, max
    finite and past it, ties between neighbours, infinities and NaN, and random values
    moved by a fraction of their ULP, one ULP, or many."""
    fi = FINFO[name]
    tiny, top = float(fi.smallest_subnormal), float(fi.max)
    pattern_values = all_values(name)[:4096] if name in SMALL else np.array([0.5, 1.0, 3.0, 1e30], dtype=np.float32)
    edge = torch.tensor([0.0, -0.0, tiny, -tiny, tiny / 2, 1.5 * tiny, top, -top, 1.5 * top, float("inf"),
                         float("-inf"), float("nan"), 1.0, -1.0, float(fi.tiny)], dtype=torch.float32)
    values = torch.from_numpy(pattern_values.copy())
    values = values[torch.isfinite(values)]
    mids = (values[:-1] + values[1:]) / 2  # ties, and points on either side of them
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-6, 3, (4000,), generator=gen)
    ulp = get_format(name).ulp(rand)
    moved = [rand + ulp * f for f in (0.3, -0.49, 0.5, 0.51, 1.0, -1.0, 7.0)]
    a = torch.cat([edge.repeat_interleave(len(edge)), mids, mids, *(rand for _ in moved), values])
    b = torch.cat([edge.repeat(len(edge)), mids.nextafter(torch.tensor(float("inf"))),
                   mids.nextafter(torch.tensor(float("-inf"))), *moved, -values])
    return a, b


@pytest.mark.parametrize("name", [*FLOATS, "fp32"])
def test_cells_differ_is_cell_id_and_ml_dtypes_rounding(name):
    """A plain float's fast crossing test (compare the nearest roundings) against its
    own cell_id and against ml_dtypes' casts after saturation (NaN is one cell)."""
    a, b = _pairs(name)
    lat = get_format(name).at(a)
    fast = lat.cells_differ(a, b)
    assert torch.equal(fast, lat.cell_id(a) != lat.cell_id(b))
    assert fast.any() and not fast.all()  # the pairs exercise both answers
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(fast[nan_a | nan_b], (nan_a != nan_b)[nan_a | nan_b])  # NaN: one cell of its own
    if name == "fp32":
        return
    dt = SMALL[name][0]
    top = float(FINFO[name].max)

    def cast(x: torch.Tensor) -> np.ndarray:
        return x.clamp(-top, top).numpy().astype(dt).astype(np.float32)  # the tool saturates, ml_dtypes does not

    qa, qb = cast(a), cast(b)
    oracle = (qa != qb) & ~(np.isnan(qa) & np.isnan(qb))
    finite = ~(nan_a | nan_b).numpy()  # fp6 / fp4 have no NaN: ml_dtypes casts it to -0
    assert np.array_equal(fast.numpy()[finite], oracle[finite])
