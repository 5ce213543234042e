"""Scaled formats (int8, int4, nf4, mx*, nvfp4) against hand-derived tables.

Expected scales come from the published recipes written out by hand (or with
Python floats / ml_dtypes for the element casts), never from the package.
"""

from __future__ import annotations

import itertools
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from hallway_audit.errors import UsageError
from hallway_audit.lattice import NAN_CELL, get_format

TINY = 2.0**-126


def t(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


# --------------------------------------------------------------------------- int8


def test_int8_hand_table():
    ref = t([[127.0, 63.5, -1.0, 0.5], [254.0, 1.0, 3.0, -254.0], [0.0, 0.0, 0.0, 0.0]])
    lat = get_format("int8").at(ref)
    assert lat.block_scale.tolist() == [1.0, 2.0, TINY]  # absmax/127; all-zero row -> 2^-126
    q = lat.quantize(ref)
    assert q.tolist() == [
        [127.0, 64.0, -1.0, 0.0],  # 63.5 and 0.5 are ties -> even (64, 0)
        [254.0, 0.0, 4.0, -254.0],  # 1/2 = 0.5 -> 0, 3/2 = 1.5 -> 2 (x2)
        [0.0, 0.0, 0.0, 0.0],
    ]
    assert lat.ulp(ref).tolist() == [[1.0] * 4, [2.0] * 4, [TINY] * 4]
    assert lat.cell_id(ref).tolist() == [[127, 64, -1, 0], [127, 0, 2, -127], [0, 0, 0, 0]]
    assert lat.max_abs(ref).tolist() == [[127.0] * 4, [254.0] * 4, [127 * TINY] * 4]
    moved = ref + t([[10.0, 0, 0, 0], [0, 0, 0, 300.0], [0, 0, 0, 1e-3]])  # saturate at 127*scale
    assert lat.quantize(moved)[:, 0].tolist() == [127.0, 254.0, 0.0]
    assert lat.quantize(moved)[1, 3].item() == 46.0  # -254+300 = 46 -> 23 * 2
    assert lat.quantize(moved)[2, 3].item() == pytest.approx(127 * TINY)  # zero row: saturates at once


def test_int8_negative_tie_and_zero_sign():
    ref = t([127.0, -63.5, -0.4, -0.0])
    q = get_format("int8").at(ref).quantize(ref)
    assert q.tolist() == [127.0, -64.0, -0.0, -0.0]
    assert [math.copysign(1, v) for v in q.tolist()[2:]] == [-1, -1]


@pytest.mark.parametrize("shape", [(), (5,), (300,)])
def test_int8_scalar_and_1d_are_one_group(shape):
    ref = torch.linspace(-3.0, 12.7, max(1, math.prod(shape))).reshape(shape)
    lat = get_format("int8").at(ref)
    assert lat.block_scale.shape == ()
    assert torch.all(lat.scale == np.float32(np.float32(ref.abs().max().item()) / np.float32(127)))


def test_int8_per_channel_on_3d():
    ref = torch.zeros(2, 3, 4)
    ref[0, 2, 3], ref[1, 0, 0] = 12.7, -25.4
    lat = get_format("int8").at(ref)
    assert lat.block_scale.tolist() == pytest.approx([0.1, 0.2], rel=1e-7)
    assert lat.scale.shape == ref.shape


def test_int8_scale_ignores_nan_and_inf():
    ref = t([[127.0, float("nan"), float("inf"), -float("inf"), 1.4]])
    lat = get_format("int8").at(ref)
    assert lat.block_scale.tolist() == [1.0]
    q = lat.quantize(ref).tolist()[0]
    assert math.isnan(q[1]) and q[2:] == [127.0, -127.0, 1.0] and q[0] == 127.0
    assert lat.cell_id(ref).tolist()[0] == [127, NAN_CELL, 127, -127, 1]
    assert math.isnan(lat.ulp(ref)[0, 1].item())


# --------------------------------------------------------------------------- int4


def test_int4_groups_of_128_with_partial_group():
    ref = torch.zeros(2, 300)
    # row r, group g: absmax 7*(1 + g + 3r) -> scale 1 + g + 3r; groups [0,128) [128,256) [256,300)
    for r in range(2):
        for g, (a, b) in enumerate([(0, 128), (128, 256), (256, 300)]):
            s = 1 + g + 3 * r
            ref[r, a] = 7.0 * s
            ref[r, a + 1] = 0.5 * s  # tie -> 0
            ref[r, a + 2] = -1.5 * s  # tie -> -2
            ref[r, b - 1] = 2.4 * s  # -> 2
    lat = get_format("int4").at(ref)
    assert lat.block_scale.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    q, cid = lat.quantize(ref), lat.cell_id(ref)
    for r in range(2):
        for g, (a, b) in enumerate([(0, 128), (128, 256), (256, 300)]):
            s = 1 + g + 3 * r
            assert torch.all(lat.scale[r, a:b] == s) and torch.all(lat.ulp(ref)[r, a:b] == s)
            assert q[r, a].item() == 7 * s and q[r, a + 1].item() == 0.0
            assert q[r, a + 2].item() == -2 * s and q[r, b - 1].item() == 2 * s
            assert cid[r, [a, a + 1, a + 2, b - 1]].tolist() == [7, 0, -2, 2]
            assert torch.all(lat.max_abs(ref)[r, a:b] == 7 * s)
    assert lat.quantize(ref + 1000.0)[1, 299].item() == 42.0  # saturates at 7 * 6


def test_int4_1d_is_grouped_along_its_only_dim():
    ref = torch.cat([torch.full((128,), 7.0), torch.full((10,), 14.0)])
    lat = get_format("int4").at(ref)
    assert lat.block_scale.tolist() == [1.0, 2.0]
    assert lat.scale[:128].eq(1).all() and lat.scale[128:].eq(2).all()


def test_int4_all_zero_group():
    ref = torch.zeros(1, 130)
    ref[0, 129] = 7.0
    lat = get_format("int4").at(ref)
    assert lat.block_scale.tolist() == [[TINY, 1.0]]
    assert lat.quantize(ref)[0, :128].eq(0).all()
    u = lat.ulp(ref)
    assert torch.all(torch.isfinite(u) & (u > 0))


# --------------------------------------------------------------------------- nf4

NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip  (QLoRA / bitsandbytes NF4 code book)


def test_nf4_levels_map_to_themselves_and_cell_ids():
    ref = torch.tensor(NF4, dtype=torch.float32)  # one block (16 <= 64), absmax 1
    lat = get_format("nf4").at(ref)
    assert lat.block_scale.tolist() == [1.0]
    assert lat.quantize(ref).tolist() == np.float32(NF4).tolist()
    assert lat.cell_id(ref).tolist() == list(range(-7, 9))
    gaps = np.diff(np.float32(NF4))
    assert lat.ulp(ref).numpy().tolist() == [*gaps.tolist(), gaps[-1]]  # gap above; end gap at 1.0


def test_nf4_midpoints_tie_to_lower_level():
    mids = [(np.float64(a) + b) / 2 for a, b in itertools.pairwise(NF4)]
    x = np.float32(mids)
    ref = torch.from_numpy(np.concatenate([x, [1.0]]).astype(np.float32))
    lat = get_format("nf4").at(ref)
    q = lat.quantize(ref).numpy()[:-1]
    assert q.tolist() == np.float32(NF4[:-1]).tolist()  # exactly at the threshold: lower level
    up = torch.from_numpy(np.concatenate([np.nextafter(x, np.float32(2)), [1.0]]).astype(np.float32))
    assert lat.quantize(up).numpy()[:-1].tolist() == np.float32(NF4[1:]).tolist()


def test_nf4_blocks_of_64_flattened():
    ref = torch.zeros(3, 50)  # 150 elements: blocks [0,64) [64,128) [128,150)
    flat = ref.view(-1)
    flat[10], flat[70], flat[149] = 2.0, -4.0, 0.5
    lat = get_format("nf4").at(ref)
    assert lat.block_scale.tolist() == [2.0, 4.0, 0.5]
    s = lat.scale.reshape(-1)
    assert s[:64].eq(2).all() and s[64:128].eq(4).all() and s[128:].eq(0.5).all()
    q = lat.quantize(ref).reshape(-1)
    assert q[10].item() == 2.0 and q[70].item() == -4.0 and q[149].item() == 0.5
    x = ref.clone().view(-1)
    x[0] = 2.0 * 0.5626170039176941 + 0.01  # nearest level 0.5626 at scale 2
    assert lat.quantize(x.view(3, 50)).view(-1)[0].item() == pytest.approx(2 * 0.5626170039176941, rel=1e-7)
    assert lat.ulp(x.view(3, 50)).view(-1)[0].item() == pytest.approx(2 * (0.7229568362236023 - 0.5626170039176941))


def test_nf4_all_zero_block_and_saturation():
    ref = torch.zeros(128)
    ref[100] = 1.0
    lat = get_format("nf4").at(ref)
    assert lat.block_scale.tolist() == [TINY, 1.0]
    assert lat.quantize(ref)[:64].eq(0).all()
    assert lat.quantize(ref * 5)[100].item() == 1.0 and lat.cell_id(ref * 5)[100].item() == 8
    assert lat.quantize(-ref * 5)[100].item() == -1.0 and lat.cell_id(-ref * 5)[100].item() == -7


@pytest.mark.parametrize("name", ["int4", "int8", "nf4", "nvfp4"])
def test_scales_from_the_block_amax_saturate_nothing(name):
    """A block's amax maps onto the top level up to one fp32 rounding (fl(amax / 7) * 7
    can be below amax): that is not saturation. Real checkpoints showed 0.03-0.05% of
    every layer 'saturated' in int4 before saturated compared in element units."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(64, 256, generator=g) * 0.05
    lat = get_format(name).at(ref)
    assert lat.saturated(ref).sum().item() == 0
    assert lat.saturated(ref * 4).any()  # the frozen lattice: 4x the weights clamp
    if name == "int4":  # the artefact the element-unit test avoids
        assert (ref.abs() > lat.max_abs(ref)).any()


# --------------------------------------------------------------------------- MX

MX = {  # name -> (element ml_dtype, emax_elem, element max)
    "mxfp8": (ml_dtypes.float8_e4m3fn, 8, 448.0),
    "mxfp6": (ml_dtypes.float6_e2m3fn, 2, 7.5),
    "mxfp4": (ml_dtypes.float4_e2m1fn, 2, 6.0),
}


def ocp_scale(block: np.ndarray, emax_elem: int) -> float:
    """OCP MX v1.0: 2^(floor(log2 amax) - emax_elem), E8M0-clamped; all-zero -> 2^-127."""
    amax = float(np.max(np.abs(block)))
    e = math.frexp(amax)[1] - 1 if amax > 0 else -126
    return 2.0 ** min(127, max(-127, e - emax_elem))


@pytest.mark.parametrize("name", list(MX))
def test_mx_block_scales_follow_ocp_formula_and_elements_match_ml_dtypes(name):
    dt, emax_elem, emax = MX[name]
    rng = np.random.default_rng(5)
    rows = [rng.standard_normal(70) * 2.0 ** rng.integers(-30, 30) for _ in range(6)]
    ref = np.stack(rows).astype(np.float32)  # 70 = 32 + 32 + partial 6
    ref[0, :32] = 0.0  # an all-zero block
    ref[1, 40] = 2.0**-140  # a tiny block max does not matter: other values dominate
    ref[2, 64:] = 1e-44  # fp32-subnormal block -> scale clamps at 2^-127
    lat = get_format(name).at(torch.from_numpy(ref))
    bs = lat.block_scale.numpy()
    assert bs.shape == (6, 3)
    for r in range(6):
        for b in range(3):
            blk = ref[r, 32 * b: 32 * b + 32]
            X = ocp_scale(blk, emax_elem)
            assert bs[r, b] == X, (r, b)
            assert math.frexp(float(bs[r, b]))[0] == 0.5  # a power of two
            expected = np.clip(blk / np.float32(X), -emax, emax).astype(dt).astype(np.float32) * np.float32(X)
            got = lat.quantize(torch.from_numpy(ref)).numpy()[r, 32 * b: 32 * b + 32]
            assert np.array_equal(got, expected.astype(np.float32)), (r, b)
    assert bs[0, 0] == 2.0**-127 and bs[2, 2] == 2.0**-127


def test_mxfp4_hand_block():
    ref = torch.zeros(32)
    ref[:6] = t([6.0, 5.0, 1.25, -0.75, 0.3, 7.9])  # amax 7.9 -> floor(log2) = 2 -> X = 2^(2-2) = 1
    lat = get_format("mxfp4").at(ref)
    assert lat.block_scale.item() == 1.0
    # 5 tie between 4 and 6 -> 4 (even mantissa); 1.25 tie -> 1.0; -0.75 tie -> -1.0 (1.0 even); 0.3 -> 0.5; 7.9 saturates
    assert lat.quantize(ref)[:6].tolist() == [6.0, 4.0, 1.0, -1.0, 0.5, 6.0]
    assert lat.cell_id(ref)[:6].tolist() == [7, 6, 2, -2, 1, 7]
    assert lat.ulp(ref)[:6].tolist() == [2.0, 2.0, 0.5, 0.5, 0.5, 2.0]
    assert lat.max_abs(ref)[0].item() == 6.0
    # 7.9 is beyond T = 6 + 2/2 = 7; 6.0 is the max itself
    assert lat.saturated(ref)[:6].tolist() == [False, False, False, False, False, True]


def test_mxfp8_saturates_only_past_half_a_step_above_448():
    """X = 2^(floor(log2 amax) - 8) puts amax / X in [256, 512): 448 < y <= 464 rounds to 448
    as ordinary rounding; y > 464 is clamped (the OCP recipe's saturation)."""
    ref = torch.zeros(32)
    ref[:4] = t([511.0, 464.0, 460.0, 448.0])  # X = 1
    lat = get_format("mxfp8").at(ref)
    assert lat.block_scale.item() == 1.0
    assert lat.saturated(ref)[:4].tolist() == [True, False, False, False]


# --------------------------------------------------------------------------- NVFP4


def test_nvfp4_two_level_scale_matches_recipe():
    rng = np.random.default_rng(9)
    ref = (rng.standard_normal((4, 40)) * np.array([[1.0], [1e-3], [30.0], [1e-6]])).astype(np.float32)
    ref[1, 16:32] = 0.0  # all-zero block
    lat = get_format("nvfp4").at(torch.from_numpy(ref))
    f32 = np.float32
    s_t = max(f32(np.abs(ref).max()) / f32(448 * 6), f32(2.0**-126))
    assert lat.tensor_scale.item() == s_t
    bs = lat.block_scale.numpy()
    assert bs.shape == (4, 3)
    q = lat.quantize(torch.from_numpy(ref)).numpy()
    for r in range(4):
        for b in range(3):
            blk = ref[r, 16 * b: 16 * b + 16]
            want = np.clip(f32(np.abs(blk).max()) / f32(6) / s_t, f32(2.0**-6), f32(448))
            s_b = f32(want).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            assert bs[r, b] == s_b, (r, b)
            assert f32(bs[r, b]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) == bs[r, b]  # an e4m3 value
            total = f32(s_t * s_b)
            el = np.clip(blk / total, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
            assert np.array_equal(q[r, 16 * b: 16 * b + 16], el * total), (r, b)
    assert bs[1, 1] == 2.0**-6  # zero block: torchao's E4M3_EPS floor


def test_nvfp4_hand_block():
    ref = torch.zeros(16)
    ref[:3] = t([2688.0, 1000.0, -7.0])  # s_t = 2688/2688 = 1; block amax/6 = 448 -> s_b = 448
    lat = get_format("nvfp4").at(ref)
    assert lat.tensor_scale.item() == 1.0 and lat.block_scale.item() == 448.0
    # 1000/448 = 2.23 -> 2 -> 896; -7/448 = -0.0156 -> -0.0 (sign kept)
    q = lat.quantize(ref)
    assert q[:3].tolist() == [2688.0, 896.0, -0.0] and math.copysign(1, q[2].item()) == -1


def test_nvfp4_all_zero_tensor_is_finite():
    ref = torch.zeros(3, 16)
    lat = get_format("nvfp4").at(ref)
    assert lat.quantize(ref).eq(0).all()
    u = lat.ulp(ref)
    assert torch.all(torch.isfinite(u) & (u > 0))


# --------------------------------------------------------------------------- shared behaviour

SCALED = ["int8", "int4", "nf4", "mxfp8", "mxfp6", "mxfp4", "nvfp4"]


@pytest.mark.parametrize("name", SCALED)
def test_shape_mismatch_is_a_usage_error(name):
    lat = get_format(name).at(torch.randn(4, 64))
    with pytest.raises(UsageError):
        lat.ulp(torch.randn(4, 32))


@pytest.mark.parametrize("name", SCALED)
def test_lattice_is_frozen_at_ref(name):
    """The probe question: the lattice of x_t judges x_{t+1} with x_t's scales."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 96, generator=g)
    lat = get_format(name).at(x0)
    x1 = x0 * 3  # would change every scale if recomputed
    assert torch.equal(lat.max_abs(x1), lat.max_abs(x0))
    assert torch.equal(lat.quantize(x0), get_format(name).quantize(x0))
    assert (lat.quantize(x1).abs() <= lat.max_abs(x1)).all()


@pytest.mark.parametrize("name", SCALED)
def test_empty_and_scalar_tensors(name):
    fmt = get_format(name)
    for x in (torch.zeros(0), torch.zeros(3, 0), torch.zeros(0, 3), torch.tensor(2.5)):
        lat = fmt.at(x)
        for out in (lat.ulp(x), lat.quantize(x), lat.max_abs(x)):
            assert out.shape == x.shape and out.dtype == torch.float32
        assert lat.cell_id(x).shape == x.shape and lat.cell_id(x).dtype == torch.int64


@pytest.mark.parametrize("name", SCALED)
def test_absmax_near_fp32_max_stays_finite(name):
    """qmax * fl(absmax / qmax) can round past fp32 max: the lattice saturates there."""
    big = float(torch.finfo(torch.float32).max)
    ref = t([big, -big, 1.0, 0.0] * 8)
    lat = get_format(name).at(ref)
    for out in (lat.quantize(ref), lat.max_abs(ref), lat.ulp(ref), lat.quantize(ref, "stochastic")):
        assert torch.isfinite(out).all()
    assert torch.equal(lat.quantize(lat.quantize(ref)), lat.quantize(ref))
