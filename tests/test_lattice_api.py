"""Public API: registry, names, describe(), argument checking, dtypes, devices."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import hallway_audit.lattice as lattice_pkg
from hallway_audit.errors import UnknownNameError, UsageError
from hallway_audit.lattice import Format, Lattice, get_format, list_formats, register
from hallway_audit.lattice import registry as registry_mod
from hallway_audit.lattice.floats import FloatFormat

ORDER = [
    "fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1",
    "int8", "int4", "nf4", "mxfp8", "mxfp6", "mxfp4", "nvfp4",
]  # fmt: skip


def test_list_formats_order():
    assert list_formats() == ORDER


def test_all_exports():
    for name in lattice_pkg.__all__:
        assert hasattr(lattice_pkg, name)
    assert {"get_format", "list_formats", "Format", "Lattice"} <= set(lattice_pkg.__all__)


@pytest.mark.parametrize(("alias", "name"), [
    ("FP32", "fp32"), ("float32", "fp32"), ("e4m3", "fp8_e4m3"), ("E4M3FN", "fp8_e4m3"),
    ("bfloat16", "bf16"), ("e5m2", "fp8_e5m2"), ("Float16", "fp16"), ("fp8-e4m3", "fp8_e4m3"),
    ("e2m1", "fp4_e2m1"), ("NVFP4", "nvfp4"),
])  # fmt: skip
def test_aliases_and_case(alias, name):
    assert get_format(alias).name == name


def test_unknown_format_lists_known_ones():
    with pytest.raises(UnknownNameError) as exc:
        get_format("fp7")
    assert exc.value.available == ORDER
    assert "fp8_e4m3" in str(exc.value) and "fp7" in str(exc.value)
    assert isinstance(exc.value, UsageError)


def test_unknown_rounding_is_usage_error():
    x = torch.ones(3)
    for name in ("bf16", "int8"):
        with pytest.raises(UsageError, match="rounding"):
            get_format(name).quantize(x, rounding="down")


@pytest.mark.parametrize("name", ORDER)
def test_describe(name):
    fmt = get_format(name)
    d = fmt.describe()
    assert set(d) == {"name", "bits", "scaled", "block", "scale", "element", "max_finite",
                      "smallest_subnormal", "ulp_at_1", "description"}
    assert d["name"] == name and isinstance(fmt, Format) and isinstance(fmt.at(torch.ones(4)), Lattice)
    assert d["max_finite"] == fmt.max_finite and d["smallest_subnormal"] == fmt.smallest_subnormal
    assert (d["element"] is not None) == fmt.scaled == d["scaled"]
    assert d["scale"] == "none" if not fmt.scaled else d["scale"] != "none"


DESCRIBE = {  # name: (bits, block, scale, element, max_finite, smallest_subnormal, ulp_at_1)
    "fp32": (32, None, "none", None, float(np.finfo(np.float32).max), 2.0**-149, 2.0**-23),
    "bf16": (16, None, "none", None, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), 2.0**-133, 2.0**-7),
    "fp16": (16, None, "none", None, 65504.0, 2.0**-24, 2.0**-10),
    "fp8_e4m3": (8, None, "none", None, 448.0, 2.0**-9, 0.125),
    "fp8_e5m2": (8, None, "none", None, 57344.0, 2.0**-16, 0.25),
    "fp6_e3m2": (6, None, "none", None, 28.0, 0.0625, 0.25),
    "fp6_e2m3": (6, None, "none", None, 7.5, 0.125, 0.125),
    "fp4_e2m1": (4, None, "none", None, 6.0, 0.5, 0.5),
    "int8": (8, None, "per-channel fp32", "int8", 127.0, 1.0, 1.0),
    "int4": (4, 128, "group fp32", "int4", 7.0, 1.0, 1.0),
    "nf4": (4, 64, "group fp32", "nf4", 1.0, 0.07958029955625534, float(np.float32(1.0) - np.float32(0.7229568362236023))),
    "mxfp8": (8, 32, "E8M0", "fp8_e4m3", 448.0, 2.0**-9, 0.125),
    "mxfp6": (6, 32, "E8M0", "fp6_e2m3", 7.5, 0.125, 0.125),
    "mxfp4": (4, 32, "E8M0", "fp4_e2m1", 6.0, 0.5, 0.5),
    "nvfp4": (4, 16, "e4m3 x fp32", "fp4_e2m1", 6.0, 0.5, 0.5),
}


@pytest.mark.parametrize("name", ORDER)
def test_describe_values(name):
    d = get_format(name).describe()
    got = (d["bits"], d["block"], d["scale"], d["element"], d["max_finite"], d["smallest_subnormal"], d["ulp_at_1"])
    want = DESCRIBE[name]
    # Strings compare exactly; numbers exactly too, except nf4's code points, which
    # are the QLoRA table's decimals (rel 1e-7). pytest.approx takes numbers only.
    assert [g for g in got if isinstance(g, str)] == [w for w in want if isinstance(w, str)]
    numbers = [(g, w) for g, w in zip(got, want, strict=True) if not isinstance(w, str)]
    for g, w in numbers:
        assert g == (pytest.approx(w, rel=1e-7) if name == "nf4" and w is not None else w)


def test_adding_a_format_is_one_registry_entry(monkeypatch):
    """fp8_e3m4 is not built in; one register() call makes it a full format."""
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    monkeypatch.setattr(registry_mod, "_ALIASES", dict(registry_mod._ALIASES))
    register(FloatFormat("fp8_e3m4", 3, 4, "ieee"), "e3m4")
    assert list_formats()[-1] == "fp8_e3m4" and get_format("E3M4").name == "fp8_e3m4"
    with np.errstate(invalid="ignore"):
        v = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e3m4).astype(np.float32)
    v = v[np.isfinite(v)]
    pos = np.unique(np.abs(v))
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)
    x = np.concatenate([v, mids, -mids])
    q = get_format("e3m4").quantize(torch.from_numpy(x)).numpy()
    assert np.array_equal(q, x.astype(ml_dtypes.float8_e3m4).astype(np.float32))
    with pytest.raises(ValueError):
        register(FloatFormat("fp8_e3m4", 3, 4, "ieee"))


@pytest.mark.parametrize("name", ORDER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_outputs_are_float32_and_shaped_like_x(name, dtype):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    fmt = get_format(name)
    lat = fmt.at(x)
    for out in (lat.ulp(x), lat.quantize(x), lat.quantize(x, "stochastic"), lat.max_abs(x)):
        assert out.dtype == torch.float32 and out.shape == x.shape
    cid = lat.cell_id(x)
    assert cid.dtype == torch.int64 and cid.shape == x.shape
    assert torch.equal(fmt.quantize(x), lat.quantize(x)) and torch.equal(fmt.ulp(x), lat.ulp(x))
    assert torch.equal(fmt.cell_id(x), lat.cell_id(x))
    if dtype in (torch.bfloat16, torch.float16):  # exact conversion: same as the fp32 copy
        assert torch.equal(lat.quantize(x), fmt.at(x.float()).quantize(x.float()))


@pytest.mark.parametrize("name", ORDER)
def test_no_autograd_graph(name):
    x = torch.randn(2, 32, requires_grad=True)
    out = get_format(name).quantize(x)
    assert not out.requires_grad


@pytest.mark.parametrize("name", ORDER)
def test_ulp_positive_and_finite_on_finite_inputs(name):
    x = torch.cat([torch.randn(2, 64) * 10.0 ** torch.randint(-20, 20, (2, 1)), torch.zeros(1, 64)])
    u = get_format(name).ulp(x)
    assert torch.all(torch.isfinite(u) & (u > 0))


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ORDER)
def test_cuda_matches_cpu(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 300, generator=g) * 10.0 ** torch.randint(-6, 6, (16, 1), generator=g)
    x[0, :5] = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-42])
    fmt = get_format(name)
    cpu, gpu = fmt.at(x), fmt.at(x.cuda())
    xc = x.cuda()
    for op in ("ulp", "quantize", "cell_id", "max_abs"):
        a, b = getattr(cpu, op)(x), getattr(gpu, op)(xc)
        assert b.device.type == "cuda"
        assert torch.equal(a.isnan(), b.cpu().isnan()) if a.is_floating_point() else True
        a, b = torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.cpu().double(), nan=0.0)
        assert torch.equal(a, b), op
    gen = torch.Generator(device="cuda").manual_seed(0)
    sr = gpu.quantize(xc, "stochastic", gen)
    assert torch.equal(gpu.quantize(sr), sr)
    assert torch.all((gpu.cell_id(sr) - gpu.cell_id(xc)).abs() <= 1)
