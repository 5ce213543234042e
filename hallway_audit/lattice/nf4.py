"""NF4: the 16 QLoRA NormalFloat levels times a per-block absmax scale.

Levels and decision thresholds are bitsandbytes' (csrc/kernels.cu, dQuantizeNF4):
the thresholds are the level midpoints as float32 constants and a value is sent
to the upper level only when strictly greater (`x > threshold`), so an exact tie
goes to the LOWER level. Blocks of 64 over the flattened tensor, scale = block
absmax (fp32), floored at 2^-126 so all-zero blocks stay finite (see integer.py).
One deliberate difference: bitsandbytes multiplies by a rounded 1/absmax, we
divide by absmax (x / scale, docs/definitions.md §2.7), which can move a value lying within one
fp32 ulp of a threshold to the other side.

ulp at y is the gap of the bracket [L_i, L_{i+1}) containing y (so at a level,
the gap above it); beyond the ends, the end gap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hallway_audit.lattice.base import FP32_TINY, Grid, nan_cells
from hallway_audit.lattice.scaled import FlatBlocks, ScaledFormat

NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

NF4_THRESHOLDS: tuple[float, ...] = (  # bitsandbytes dQuantizeNF4 pivots, low to high
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)  # fmt: skip

ZERO_INDEX = 7  # NF4_LEVELS[7] == 0.0; cell_id = level index - 7


class LevelGrid(Grid):
    """An arbitrary sorted level table with explicit rounding thresholds."""

    def __init__(self, name: str, levels: tuple[float, ...], thresholds: tuple[float, ...], zero_index: int) -> None:
        self.name, self.zero_index = name, zero_index
        self._levels = torch.tensor(levels, dtype=torch.float32)
        self._thresholds = torch.tensor(thresholds, dtype=torch.float32)
        self._gaps = self._levels[1:] - self._levels[:-1]
        self.max_value = float(max(abs(levels[0]), abs(levels[-1])))
        self.smallest_positive = float(min(v for v in self._levels.tolist() if v > 0))
        self._per_device: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _tables(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The tables on y's device, copied there once (no host->device copy per call)."""
        t = self._per_device.get(y.device)
        if t is None:
            t = (self._levels.to(y.device), self._thresholds.to(y.device), self._gaps.to(y.device))
            self._per_device[y.device] = t
        return t

    def _bracket(self, y: Tensor, levels: Tensor) -> Tensor:
        """i with levels[i] <= y < levels[i+1], clamped to the end brackets."""
        i = torch.searchsorted(levels, y.contiguous(), right=True) - 1
        return i.clamp(0, levels.numel() - 2)

    def _index(self, y: Tensor, thresholds: Tensor) -> Tensor:
        """Nearest level index: number of thresholds strictly below y (bnb's `x > t`)."""
        return torch.searchsorted(thresholds, torch.nan_to_num(y, nan=0.0).contiguous())

    def ulp(self, y: Tensor) -> Tensor:
        levels, _, gaps = self._tables(y)
        g = gaps[self._bracket(torch.nan_to_num(y, nan=0.0), levels)]
        return torch.where(torch.isnan(y), y, g)

    def round(self, y: Tensor, u: Tensor | None = None) -> Tensor:
        levels, thresholds, gaps = self._tables(y)
        if u is None:
            idx = self._index(y, thresholds)
        else:
            yc = torch.nan_to_num(y, nan=0.0).clamp(levels[0], levels[-1])  # saturate first
            i = self._bracket(yc, levels)
            p = (yc - levels[i]) / gaps[i]  # in [0, 1]; 0 exactly on a level
            idx = i + (u < p).to(i.dtype)
        q = torch.where(torch.isnan(y), y, levels[idx])
        return torch.copysign(q, y)

    def overflow_bound(self) -> tuple[float, bool]:
        # no level lies beyond the table: mirror the top gap (ties stay on the table)
        top = float(self._gaps[-1] if abs(self._levels[-1]) >= abs(self._levels[0]) else self._gaps[0])
        return self.max_value + top / 2, False

    def cell_id(self, y: Tensor) -> Tensor:
        _, thresholds, _ = self._tables(y)
        return nan_cells(self._index(y, thresholds) - self.zero_index, y)


class NF4Format(ScaledFormat):
    """QLoRA NF4 with blockwise absmax scales (bitsandbytes layout)."""

    name, bits, element = "nf4", 4, "nf4"
    scale_kind = "group fp32"

    def __init__(self, block: int = 64) -> None:
        self.block = block
        self.blocking = FlatBlocks(block)
        self.grid = LevelGrid("nf4", NF4_LEVELS, NF4_THRESHOLDS, ZERO_INDEX)
        self.description = (
            f"QLoRA NormalFloat4: 16 levels, absmax scale per {block} elements (flattened)"
        )

    def block_scales(self, a: Tensor) -> tuple[Tensor, None]:
        return self.blocking.amax(a).clamp(min=FP32_TINY), None
