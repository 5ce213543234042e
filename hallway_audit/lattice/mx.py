"""Block-scaled microscaling floats: OCP MX (E8M0 scale) and NVIDIA NVFP4.

MX (OCP Microscaling v1.0, sec. 6.3): blocks of 32 along the last dim, shared
scale X = 2^(floor(log2 amax) - emax_elem), emax_elem the element's largest normal
exponent (e4m3: 8, e2m3: 2, e2m1: 2), clamped to E8M0's 2^-127..2^127. Elements are
the saturating RNE cast of x / X. An all-zero block uses log2(amax) := -126 (the
fp32 min-normal trick of Microsoft's microxcaling reference), i.e. X = 2^-127 after
the clamp. Because X is a power of two, x / X and element * X are exact.

mxfp6 uses e2m3 elements (more mantissa; the OCP spec lists both, e2m3 is the
usual pick for weights). mxfp6_e3m2 is one registry entry away.

NVFP4 follows NVIDIA / torchao (`nvfp4_quantize` with a per-tensor scale):
    s_t = amax(tensor) / (448 * 6)                      fp32, floored at 2^-126
    s_b = e4m3_rne(clamp(amax(block) / 6 / s_t, 2^-6, 448))   per 16 along last dim
    scale = s_t * s_b (fp32 product), elements = e2m1_rne_saturating(x / scale).
The 2^-6 floor is torchao's E4M3_EPS (smallest normal e4m3); it also gives
all-zero blocks a usable scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hallway_audit.lattice.base import FP32_TINY
from hallway_audit.lattice.floats import FloatFormat, FloatGrid, exp2i, floor_log2
from hallway_audit.lattice.scaled import LastDimBlocks, ScaledFormat

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


class MXFormat(ScaledFormat):
    grid: FloatGrid
    """OCP MX: `element` floats sharing one power-of-two (E8M0) scale per `block`."""

    scale_kind = "E8M0"

    def __init__(self, name: str, element: FloatFormat, block: int = 32, description: str = "") -> None:
        self.name, self.block, self.element = name, block, element.name
        self.grid = element.grid
        self.bits = element.bits
        self.blocking = LastDimBlocks(block)
        self.description = description or (
            f"OCP MX: {element.name} elements, E8M0 power-of-two scale per {block} (last dim)"
        )

    def block_scales(self, a: Tensor) -> tuple[Tensor, None]:
        amax = self.blocking.amax(a)
        e = torch.where(amax > 0, floor_log2(amax), -126) - self.grid.emax
        return exp2i(e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)), None


class NVFP4Format(ScaledFormat):
    grid: FloatGrid
    scale_grid: FloatGrid
    """NVIDIA NVFP4: e2m1 elements, e4m3 scale per 16 (last dim) times an fp32 tensor scale."""

    name, bits, scale_kind = "nvfp4", 4, "e4m3 x fp32"

    def __init__(self, element: FloatFormat, scale_format: FloatFormat, block: int = 16) -> None:
        self.block, self.element = block, element.name
        self.grid, self.scale_grid = element.grid, scale_format.grid
        self.blocking = LastDimBlocks(block)
        self.description = (
            f"NVIDIA NVFP4: {element.name} elements, {scale_format.name} scale per {block} "
            "(last dim) x fp32 per-tensor scale"
        )

    def block_scales(self, a: Tensor) -> tuple[Tensor, Tensor]:
        emax, smax = self.grid.max_value, self.scale_grid.max_value  # 6, 448
        tensor_amax = a.amax() if a.numel() else a.new_zeros(())
        s_t = (tensor_amax / (smax * emax)).clamp(min=FP32_TINY)
        s_b = (self.blocking.amax(a) / emax / s_t).clamp(2.0**self.scale_grid.emin, smax)
        return self.scale_grid.round(s_b), s_t
