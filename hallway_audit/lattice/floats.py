"""IEEE-like binary floats, one parameterised class for all of them.

The grid of a float with `mbits` mantissa bits and exponents emin..emax has, in
binade e (2^e <= |v| < 2^(e+1), subnormals using e = emin), spacing
2^(e - mbits). Rounding is done by scaling into integers: y / ulp is exact (ulp is
a power of two and the quotient has at most mbits+1 significant bits), torch.round
is round-half-to-even, and n * ulp is exact again. So the result is the correctly
rounded (RNE) value, bit-identical to ml_dtypes' casts, with no log2 anywhere: the
binade 2^floor(log2|y|) is read off the fp32 exponent field by masking (exact, one
op; fp32 subnormals lie below every format's emin and are clamped up anyway). MX
scale exponents use torch.frexp, and powers of two are built from their bit
pattern (exact on every device, unlike pow()).

Saturation: values beyond max_finite (and +-inf) go to +-max_finite, even for
formats that have an inf (e5m2, fp16, bf16, fp32): saturating casts are what fp8
training recipes use (docs/definitions.md §2.3).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from hallway_audit.lattice.base import Format, Grid, Lattice, check_rounding, nan_cells, to_f32, uniform_like

Special = Literal["ieee", "fn", "finite"]


_EXP_FIELD = 0x7F800000  # fp32 exponent bits


def exp2i(e: Tensor) -> Tensor:
    """Exactly 2**e as float32 for integer e in [-149, 127], built from its bits."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=1) << 23  # biased exponent field, mantissa 0
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)  # subnormal: one mantissa bit
    return torch.where(e >= -126, normal, sub).view(torch.float32)


# Formats whose nearest rounding uses torch's own cast (None: fp32 itself). Measured
# on CPU (262k elements): bf16/fp16 casts take ~70 us against ~400 us emulated; the
# fp8 casts are scalar loops in torch 2.13 (~640 us for e4m3) and lose to the
# emulation, so they stay emulated. The exhaustive ml_dtypes tests run through
# whichever path a format takes.
_NATIVE: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def floor_log2(a: Tensor) -> Tensor:
    """floor(log2 a) (int32) for finite positive float32 a, subnormals included.

    frexp gives a = m * 2^k with m in [0.5, 1), so floor(log2 a) = k - 1. Zero,
    inf and NaN give garbage the callers mask out.
    """
    return torch.frexp(a)[1] - 1


def binade(y: Tensor) -> Tensor:
    """2^floor(log2|y|) for fp32-normal y by masking the exponent field (exact, one op):
    0 for zero and fp32 subnormals, inf for inf and NaN. Callers clamp to [2^emin, 2^emax],
    and emin >= -126 for every format, so the fp32-subnormal case needs no care."""
    return (y.view(torch.int32) & _EXP_FIELD).view(torch.float32)


class FloatGrid(Grid):
    """Values of a float format with `ebits` exponent and `mbits` mantissa bits.

    special: "ieee" = top exponent reserved for inf/NaN (fp32, bf16, fp16, e5m2);
    "fn" = only all-ones is NaN, no inf (OCP e4m3fn: max 1.75 * 2^8 = 448);
    "finite" = every pattern is a number (OCP MX fp6/fp4 elements).
    """

    def __init__(self, name: str, ebits: int, mbits: int, special: Special) -> None:
        bias = 2 ** (ebits - 1) - 1
        self.name, self.ebits, self.mbits, self.special = name, ebits, mbits, special
        self.emin = 1 - bias
        top = 2**ebits - 1 - bias  # largest exponent field, unbiased
        if special == "ieee":
            self.emax, frac_max = top - 1, 2.0 - 2.0**-mbits
        elif special == "fn":
            self.emax, frac_max = top, 2.0 - 2.0 ** (1 - mbits)  # mantissa all-ones is NaN
        elif special == "finite":
            self.emax, frac_max = top, 2.0 - 2.0**-mbits
        else:
            raise ValueError(f"unknown special-value layout {special!r}")
        self.max_value = frac_max * 2.0**self.emax
        self.smallest_positive = 2.0 ** (self.emin - mbits)
        self.has_inf = special == "ieee"
        self.has_nan = special != "finite"
        # (fp32 bits >> shift) - offset is the ordinal of a normal value of this format
        self._shift, self._offset = 23 - mbits, (127 + self.emin - 1) << mbits

    def _step(self, y: Tensor) -> Tensor:
        """Spacing at y: y's binade clamped to [2^emin, 2^emax] (subnormals, zero, and
        beyond max / inf take the end binades), times 2^-mbits. NaN gives 2^emax."""
        b = binade(y).clamp(2.0**self.emin, 2.0**self.emax)
        return b * 2.0**-self.mbits  # exact: power of two times power of two

    def ulp(self, y: Tensor) -> Tensor:
        return torch.where(torch.isnan(y), y, self._step(y))

    def round(self, y: Tensor, u: Tensor | None = None) -> Tensor:
        if u is None and self.name in _NATIVE:
            # torch's own casts are round-to-nearest-even with subnormals, and keep NaN
            # and the sign of zero: after the saturating clamp no value can overflow,
            # so clamp + cast + widen is the same lattice point in 3 passes, not 7.
            # (fp32 is the identity on fp32 input: only the clamp saturates inf.)
            clamped = y.clamp(-self.max_value, self.max_value)
            native = _NATIVE[self.name]
            return clamped if native is None else clamped.to(native).to(torch.float32)
        step = self._step(y)
        r = y / step  # exact: power-of-two divisor, result has <= mbits+1 bits
        if u is None:  # half to even; round/mul/clamp all keep the sign of zero
            return (torch.round(r) * step).clamp(-self.max_value, self.max_value)
        f = torch.floor(r)
        n = f + (u < (r - f)).to(r.dtype)  # up with probability frac(r); exact
        q = (n * step).clamp(-self.max_value, self.max_value)  # saturate; NaN passes
        return torch.copysign(q, y)  # -tiny may round up to +0: keep x's sign

    def overflow_bound(self) -> tuple[float, bool]:
        # the next value would be max + one top-binade step; its mantissa is even (ties
        # go up, IEEE's overflow threshold) unless max itself ends in 0 (e4m3fn: 448 =
        # 1.110b x 2^8, the all-ones pattern above it is NaN, so 464 rounds to 448)
        half = 2.0 ** (self.emax - self.mbits - 1)
        return self.max_value + half, self.special != "fn"

    def cell_id(self, y: Tensor) -> Tensor:
        a = self.round(y).abs()
        normal = (a.view(torch.int32) >> self._shift) - self._offset
        sub = (a / self.smallest_positive).to(torch.int32)  # exact integer for a < 2^emin
        cid = torch.where(a < 2.0**self.emin, sub, normal)  # int32: ordinals < 2^31
        return nan_cells(torch.where(y < 0, -cid, cid), y)


class PlainLattice(Lattice):
    """A float format's lattice: no state, any shape."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    @torch.no_grad()
    def ulp(self, x: Tensor) -> Tensor:
        return self.grid.ulp(to_f32(x))

    @torch.no_grad()
    def quantize(
        self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
    ) -> Tensor:
        mode = check_rounding(rounding)
        y = to_f32(x)
        return self.grid.round(y, uniform_like(y, generator) if mode == "stochastic" else None)

    @torch.no_grad()
    def cell_id(self, x: Tensor) -> Tensor:
        return self.grid.cell_id(to_f32(x))

    @torch.no_grad()
    def cells_differ(self, a: Tensor, b: Tensor) -> Tensor:
        # A plain float's cells are its points, one per value (+-0 one point, every NaN
        # one cell): comparing the nearest roundings is cell_id's answer in a third of
        # its passes (a bf16 cast and a compare, against bit shifts, a subnormal branch
        # and the signs), which was a fifth of a full fine-tuning burst on a 20M model.
        qa, qb = self.grid.round(to_f32(a)), self.grid.round(to_f32(b))
        return (qa != qb) & ~(torch.isnan(qa) & torch.isnan(qb))

    @torch.no_grad()
    def max_abs(self, x: Tensor) -> Tensor:
        y = to_f32(x)
        return torch.full_like(y, self.grid.max_value)

    @torch.no_grad()
    def saturated(self, x: Tensor) -> Tensor:
        return self.grid.overflows(to_f32(x))


class FloatFormat(Format):
    """A plain (unscaled) float format; every IEEE-like format is one instance."""

    scaled = False
    grid: FloatGrid

    def __init__(
        self, name: str, ebits: int, mbits: int, special: Special = "ieee", description: str = ""
    ) -> None:
        self.name = name
        self.grid = FloatGrid(name, ebits, mbits, special)
        self.bits = 1 + ebits + mbits
        self.ebits, self.mbits = ebits, mbits
        self.has_inf, self.has_nan = self.grid.has_inf, self.grid.has_nan
        self.description = description or f"{self.bits}-bit float e{ebits}m{mbits}"
        self._lattice = PlainLattice(self.grid)

    def at(self, ref: Tensor) -> Lattice:
        return self._lattice  # nothing to compute: a float lattice has no scale
