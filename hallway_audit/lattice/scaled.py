"""Scaled formats: an element grid times per-element scales frozen from a reference.

For every scaled format: y = x / scale, ulp = scale * grid.ulp(y),
quantize = scale * grid.round(y), cell_id = grid.cell_id(y) (the index within the
element grid, so a cell is "this level of this block"), max_abs = scale * grid.max.

Scales are computed from the *finite* entries of the reference only: one NaN or
inf in a checkpoint does not poison its whole group (the static audit counts
non-finite values separately); NaN entries still quantize to NaN and inf entries
saturate. Blocks are formed by `Blocking` objects; the scale is expanded to the
reference's shape once in `at()` so every later call is plain elementwise work.
Products level * scale saturate at the fp32 range (absmax near fp32 max).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from hallway_audit.errors import UsageError
from hallway_audit.lattice.base import Format, Grid, Lattice, check_rounding, to_f32, uniform_like


def finite_abs(ref: Tensor) -> Tensor:
    """|ref| with NaN and +-inf replaced by 0, so they do not set any scale."""
    return torch.nan_to_num(ref.abs(), nan=0.0, posinf=0.0, neginf=0.0)


class Blocking(ABC):
    """How elements are grouped under one scale: reduce to per-block amax, expand back."""

    @abstractmethod
    def amax(self, a: Tensor) -> Tensor:
        """Per-block max of a (a >= 0), in a compact block shape."""

    @abstractmethod
    def expand(self, block_values: Tensor, shape: torch.Size) -> Tensor:
        """Per-block values broadcast back to one value per element of `shape`."""


class PerChannel(Blocking):
    """One group per index of dim 0 (output channel); 0-d and 1-D tensors are one group."""

    def amax(self, a: Tensor) -> Tensor:
        if a.dim() <= 1:
            return a.amax() if a.numel() else a.new_zeros(())
        if math.prod(a.shape[1:]) == 0:  # (n, 0, ...): nothing to reduce over
            return a.new_zeros(a.shape[0])
        return a.flatten(1).amax(dim=1)

    def expand(self, block_values: Tensor, shape: torch.Size) -> Tensor:
        if len(shape) <= 1:
            return block_values.expand(shape)
        return block_values.view(-1, *([1] * (len(shape) - 1))).expand(shape)


class LastDimBlocks(Blocking):
    """Contiguous blocks of `size` along the last dim; a partial last block is its own
    block. A 1-D tensor is blocked along its only dim, a 0-d tensor is one block."""

    def __init__(self, size: int) -> None:
        self.size = size

    def amax(self, a: Tensor) -> Tensor:
        a = a.reshape(1) if a.dim() == 0 else a
        n = a.shape[-1]
        nb = -(-n // self.size)  # blocks per row, the last one maybe partial
        a = F.pad(a, (0, nb * self.size - n))  # zero padding never raises an amax
        return a.reshape(*a.shape[:-1], nb, self.size).amax(dim=-1)

    def expand(self, block_values: Tensor, shape: torch.Size) -> Tensor:
        n = shape[-1] if len(shape) else 1
        full = block_values.unsqueeze(-1).expand(*block_values.shape, self.size)
        full = full.reshape(*block_values.shape[:-1], block_values.shape[-1] * self.size)[..., :n]
        return full.reshape(shape)


class FlatBlocks(Blocking):
    """Blocks of `size` over the flattened (row-major) tensor, as bitsandbytes does."""

    def __init__(self, size: int) -> None:
        self.size = size

    def amax(self, a: Tensor) -> Tensor:
        a = a.reshape(-1)
        a = F.pad(a, (0, (-a.numel()) % self.size))
        return a.reshape(-1, self.size).amax(dim=-1)

    def expand(self, block_values: Tensor, shape: torch.Size) -> Tensor:
        full = block_values.unsqueeze(-1).expand(-1, self.size).reshape(-1)
        return full[: shape.numel()].reshape(shape)


FP32_MAX = float(torch.finfo(torch.float32).max)


def _times(level: Tensor, scale: Tensor) -> Tensor:
    """level * scale, saturating at the fp32 range: with absmax near fp32 max,
    qmax * fl(absmax / qmax) can round past it, and the lattice must stay finite."""
    return (level * scale).clamp(-FP32_MAX, FP32_MAX)


class ScaledLattice(Lattice):
    """grid x scale, with `scale` (ref's shape, float32) frozen.

    block_scale is the compact per-block scale as stored by the format (E8M0 power
    of two, e4m3 value, fp32...); tensor_scale is nvfp4's second-level scale.
    """

    def __init__(
        self,
        grid: Grid,
        scale: Tensor,
        block_scale: Tensor,
        tensor_scale: Tensor | None = None,
    ) -> None:
        self.grid, self.scale = grid, scale
        self.block_scale, self.tensor_scale = block_scale, tensor_scale
        self.shape = scale.shape

    def _check(self, x: Tensor) -> Tensor:
        x = to_f32(x)
        if x.shape != self.shape:
            raise UsageError(
                f"tensor of shape {tuple(x.shape)} on a lattice built for shape {tuple(self.shape)}"
            )
        return x

    def _y(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._check(x)
        return x, x / self.scale  # element units

    @torch.no_grad()
    def ulp(self, x: Tensor) -> Tensor:
        _, y = self._y(x)
        return self.scale * self.grid.ulp(y)

    @torch.no_grad()
    def quantize(
        self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
    ) -> Tensor:
        mode = check_rounding(rounding)
        x, y = self._y(x)
        nearest = _times(self.grid.round(y), self.scale)
        if mode == "nearest":
            return nearest
        sr = _times(self.grid.round(y, uniform_like(y, generator)), self.scale)
        # With a non-power-of-two scale, fl(level*scale)/scale can miss the level by
        # one fp32 ulp; a value already on the lattice must come back unchanged.
        return torch.where(nearest == x, x, sr)

    @torch.no_grad()
    def cell_id(self, x: Tensor) -> Tensor:
        _, y = self._y(x)
        return self.grid.cell_id(y)

    @torch.no_grad()
    def max_abs(self, x: Tensor) -> Tensor:
        self._check(x)
        return _times(torch.full_like(self.scale, self.grid.max_value), self.scale)

    @torch.no_grad()
    def saturated(self, x: Tensor) -> Tensor:
        # in element units, as the cast sees it: a block's own amax maps to max_value
        # up to an fp32 rounding and is never counted (x > scale * qmax can be true there)
        return self.grid.overflows(self._y(x)[1])


class ScaledFormat(Format):
    """A format whose lattice is grid x scales derived from the tensor itself."""

    scaled = True
    blocking: Blocking

    @abstractmethod
    def block_scales(self, a: Tensor) -> tuple[Tensor, Tensor | None]:
        """(compact per-block scale, per-tensor scale or None) from finite |ref| = a."""

    @torch.no_grad()
    def at(self, ref: Tensor) -> ScaledLattice:
        ref = to_f32(ref)
        block_scale, tensor_scale = self.block_scales(finite_abs(ref))
        eff = block_scale if tensor_scale is None else block_scale * tensor_scale
        scale = self.blocking.expand(eff, ref.shape)
        return ScaledLattice(self.grid, scale, block_scale, tensor_scale)
