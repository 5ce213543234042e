"""Symmetric integer formats: levels -qmax..qmax times an fp32 absmax scale.

scale = absmax / qmax (fp32 division), floored at 2^-126 (FP32_TINY). The floor
covers all-zero groups (and groups whose absmax/qmax would underflow): zeros then
quantize to exactly 0, ulp stays positive and finite, and any nonzero update
leaves cell 0 -- which is what a real quantizer does, since it would re-derive
the scale from the moved weights. Rounding is half-to-even (torch.round), as
torch.fake_quantize and torchao do. The lattice values are fl(n * scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hallway_audit.lattice.base import FP32_TINY, Grid, nan_cells
from hallway_audit.lattice.scaled import Blocking, ScaledFormat


class IntGrid(Grid):
    """The integers -qmax..qmax; spacing 1 everywhere."""

    def __init__(self, name: str, qmax: int) -> None:
        self.name, self.qmax = name, qmax
        self.max_value, self.smallest_positive = float(qmax), 1.0

    def ulp(self, y: Tensor) -> Tensor:
        return torch.where(torch.isnan(y), y, torch.ones_like(y))

    def round(self, y: Tensor, u: Tensor | None = None) -> Tensor:
        if u is None:  # half to even; round and clamp keep the sign of zero
            return torch.round(y).clamp(-self.qmax, self.qmax)
        f = torch.floor(y)
        n = f + (u < (y - f)).to(y.dtype)  # up with probability frac(y)
        return torch.copysign(n.clamp(-self.qmax, self.qmax), y)  # -tiny -> -0.0

    def overflow_bound(self) -> tuple[float, bool]:
        return self.qmax + 0.5, True  # qmax is odd: qmax + 0.5 rounds to the even qmax + 1

    def cell_id(self, y: Tensor) -> Tensor:
        n = torch.nan_to_num(self.round(y), nan=0.0)
        return nan_cells(n.to(torch.int32), y)


class IntFormat(ScaledFormat):
    grid: IntGrid
    """Symmetric int format with `bits` bits (levels +-(2^(bits-1)-1)) over `blocking`."""

    def __init__(
        self, name: str, bits: int, blocking: Blocking, block: int | None, scale_kind: str,
        description: str,
    ) -> None:
        self.name, self.bits, self.blocking, self.block = name, bits, blocking, block
        self.grid = IntGrid(name, 2 ** (bits - 1) - 1)
        self.scale_kind, self.element, self.description = scale_kind, name, description

    def block_scales(self, a: Tensor) -> tuple[Tensor, None]:
        amax = self.blocking.amax(a)
        return (amax / self.grid.qmax).clamp(min=FP32_TINY), None
