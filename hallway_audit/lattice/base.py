"""Abstract pieces shared by every number format: Grid, Lattice, Format.

A *grid* is the set of values of an element format in its own units (fp8 values,
int levels -127..127, the 16 NF4 levels). A *lattice* is a grid placed in real
numbers: for plain floats the grid itself, for scaled formats the grid times
per-element scales that were computed once from a reference tensor and then
frozen. Keeping the scale fixed is what lets a training probe ask "did x_{t+1}
leave the cell x_t was in, on x_t's lattice" without the scale moving under it.

Conventions that hold for every format (and are tested):
* all arithmetic is float32; bf16/fp16 inputs convert exactly, float64 inputs are
  first rounded to float32 (nearest-even) -- the lattice is never finer than fp32;
* outputs are float32 on x's device;
* quantize saturates at +-max (also for +-inf), NaN stays NaN, and a zero result
  carries the sign of x (like an IEEE cast: -tiny -> -0.0) in both rounding modes;
* ulp(NaN) is NaN; cell_id(NaN) is NAN_CELL (int64 min); -0.0 and +0.0 share cell 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from hallway_audit.errors import UsageError

#: cell id given to NaN inputs: int64 min, far from any real cell (|id| < 2^31).
NAN_CELL: int = torch.iinfo(torch.int64).min

#: smallest positive normal float32 (2^-126); the floor for fp32 scales so that
#: x / scale stays finite and ulp stays a positive normal number.
FP32_TINY: float = 2.0**-126

ROUNDING_MODES = ("nearest", "stochastic")
_ROUNDING_ALIASES = {
    "nearest": "nearest",
    "nearest_even": "nearest",
    "nearest-even": "nearest",
    "rne": "nearest",
    "stochastic": "stochastic",
    "sr": "stochastic",
}


def check_rounding(rounding: str) -> str:
    """Canonical rounding name, or UsageError for anything else."""
    mode = _ROUNDING_ALIASES.get(str(rounding).lower())
    if mode is None:
        raise UsageError(
            f"unknown rounding mode {rounding!r}. Available: {', '.join(ROUNDING_MODES)}"
        )
    return mode


def to_f32(x: Any) -> Tensor:
    """x as a float32 tensor on its own device (fp64 is rounded to fp32 here)."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.is_complex():
        raise UsageError("number formats take real tensors, got a complex one")
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def uniform_like(y: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0,1) draws for stochastic rounding, on y's device, from `generator` if given (drawn
    on the generator's device: under a device map the weights live on several devices)."""
    device = generator.device if generator is not None else y.device
    return torch.rand(y.shape, generator=generator, device=device, dtype=torch.float32).to(y.device)


def nan_cells(cid: Tensor, y: Tensor) -> Tensor:
    """Replace the cells of NaN entries with the NAN_CELL sentinel."""
    return torch.where(torch.isnan(y), NAN_CELL, cid.to(torch.int64))


class Grid(ABC):
    """An element format's values in its own units; all methods are elementwise.

    `round` saturates at +-max_value and takes the uniform draws `u` from the caller
    (None = nearest), so a grid holds no randomness and no state.
    """

    name: str
    max_value: float  # largest finite magnitude
    smallest_positive: float  # smallest positive value (subnormal for floats)

    @abstractmethod
    def ulp(self, y: Tensor) -> Tensor:
        """Spacing of the grid at y (float32, NaN for NaN)."""

    @abstractmethod
    def round(self, y: Tensor, u: Tensor | None = None) -> Tensor:
        """Nearest (u None) or stochastic (round up iff u < fraction) grid value."""

    @abstractmethod
    def cell_id(self, y: Tensor) -> Tensor:
        """Signed ordinal (int64) of the nearest grid value; NAN_CELL for NaN."""

    @abstractmethod
    def overflow_bound(self) -> tuple[float, bool]:
        """(T, tie_up): where nearest rounding leaves the grid. T is max_value plus half
        the spacing a next value would have; at |y| == T the tie goes up iff tie_up."""

    def overflows(self, y: Tensor) -> Tensor:
        """Whether nearest rounding of y lands beyond +-max_value, so the cast must
        saturate it (or overflow to inf / NaN); values inside T round to max_value
        with an ordinary rounding error. NaN is False."""
        bound, tie_up = self.overflow_bound()
        a = y.abs()
        return (a >= bound) if tie_up else (a > bound)


class Lattice(ABC):
    """A format with its scales fixed. x must have the reference's shape (scaled formats)."""

    @abstractmethod
    def ulp(self, x: Tensor) -> Tensor:
        """Lattice spacing at x (float32, x's shape)."""

    @abstractmethod
    def quantize(
        self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
    ) -> Tensor:
        """x rounded onto the lattice, saturating (float32, x's shape)."""

    @abstractmethod
    def cell_id(self, x: Tensor) -> Tensor:
        """Signed index (int64) of the lattice cell x rounds to (nearest)."""

    def cells_differ(self, a: Tensor, b: Tensor) -> Tensor:
        """Whether a and b lie in different cells (bool, elementwise): what a boundary
        crossing counts, once per weight per probe step, so formats may do it faster."""
        return self.cell_id(a) != self.cell_id(b)

    @abstractmethod
    def max_abs(self, x: Tensor) -> Tensor:
        """Largest representable magnitude at each element's position (float32)."""

    @abstractmethod
    def saturated(self, x: Tensor) -> Tensor:
        """Whether each element saturates: its nearest rounding lies beyond the largest
        magnitude at its position (Grid.overflows on x in element units)."""


class Format(ABC):
    """A number format. Subclasses set the attributes and implement `at`."""

    name: str
    bits: int  # bits per stored element, scale overhead excluded
    scaled: bool
    description: str
    grid: Grid  # the element format (for plain floats: the format itself)
    block: int | None = None  # elements sharing one scale (None: none / per-channel)
    scale_kind: str = "none"  # "none" | "per-channel fp32" | "group fp32" | "E8M0" | ...
    element: str | None = None  # element format name for scaled formats

    @property
    def max_finite(self) -> float:
        """Largest finite value; for scaled formats in units of the scale."""
        return self.grid.max_value

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value; for scaled formats in units of the scale."""
        return self.grid.smallest_positive

    @abstractmethod
    def at(self, ref: Tensor) -> Lattice:
        """The lattice `ref` lives on (scaled formats: scales computed from ref once)."""

    @torch.no_grad()
    def ulp(self, x: Tensor) -> Tensor:
        return self.at(x).ulp(x)

    @torch.no_grad()
    def quantize(
        self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None
    ) -> Tensor:
        return self.at(x).quantize(x, rounding, generator)

    @torch.no_grad()
    def cell_id(self, x: Tensor) -> Tensor:
        return self.at(x).cell_id(x)

    def describe(self) -> dict[str, Any]:
        """Static facts about the format, for `hallway-audit formats`."""
        with torch.no_grad():
            ulp1 = float(self.grid.ulp(torch.ones((), dtype=torch.float32)))
        return {
            "name": self.name,
            "bits": self.bits,
            "scaled": self.scaled,
            "block": self.block,
            "scale": self.scale_kind,
            "element": self.element,
            "max_finite": self.max_finite,
            "smallest_subnormal": self.smallest_subnormal,
            "ulp_at_1": ulp1,
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"<Format {self.name}>"
