"""Boundary crossing: beta (weights), beta_eff (activations), ULP-normalized updates."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise

import torch
from torch import Tensor, nn

from ..lattice import Format

# |delta| / ULP in log2 bins: [0, 1/64), [1/64, 1/32), ..., [32, 64), [64, inf).
HIST_EDGES: tuple[float, ...] = tuple(2.0**k for k in range(-6, 7))
_BIN_EDGES = ("1/64", "1/32", "1/16", "1/8", "1/4", "1/2", "1", "2", "4", "8", "16", "32", "64")
HIST_LABELS: tuple[str, ...] = ("<1/64", *(f"{a}-{b}" for a, b in pairwise(_BIN_EDGES)), ">64")


@torch.no_grad()
def ulp_histogram(delta: Tensor, ulp: Tensor) -> Tensor:
    """Counts of |delta|/ULP in HIST_LABELS bins (int64, CPU)."""
    ratio = (delta.abs() / ulp).flatten()
    edges = torch.tensor(HIST_EDGES, dtype=ratio.dtype, device=ratio.device)
    idx = torch.bucketize(ratio, edges, right=True)
    return torch.bincount(idx, minlength=len(HIST_LABELS)).cpu()


@torch.no_grad()
def cell_changes(fmt: Format, before: Tensor, after: Tensor) -> int:
    """Weights whose cell changed, on the lattice `before` lives on.

    The lattice is fixed at `before` (scales computed from it): a per-channel int8
    or nf4 scale that moves with the tensor's absmax would otherwise shift every
    quantized value a little and count as a crossing everywhere; a boundary
    crossing is a weight leaving its cell.
    """
    return int(torch.count_nonzero(fmt.at(before).cells_differ(before, after)))


@torch.no_grad()
def crossing_counts(fmt: Format, before: Tensor, after: Tensor, proposed: Tensor) -> tuple[int, int, Tensor]:
    """(cells changed, proposed steps > ULP/2, histogram) for one weight tensor.

    Cells changed is what happened, whatever the rounding mode or master weights.
    """
    lattice_ulp = fmt.at(before).ulp(before)
    moved = int(torch.count_nonzero(proposed.abs() > lattice_ulp / 2))
    return cell_changes(fmt, before, after), moved, ulp_histogram(proposed, lattice_ulp)


class ActivationCells:
    """Cell ids of probed modules' outputs in the activation format (for beta_eff).

    Also applies activation quantization (straight-through) when the precision stack
    has an activation format, so every forward of the burst sees it.
    """

    def __init__(self, module: nn.Module, names: list[str], fmt: Format | None, quantize: bool) -> None:
        self.module, self.names, self.fmt, self.quantize = module, names, fmt, quantize
        self.recording = False
        self.cells: dict[str, Tensor] = {}

    def _hook(self, name: str):
        def hook(_mod: nn.Module, _inp: object, out: Tensor) -> Tensor | None:
            if not isinstance(out, Tensor) or self.fmt is None:
                return None
            if self.quantize:
                q = self.fmt.at(out.detach()).quantize(out.detach())
                out = out + (q - out).detach()  # straight-through
            if self.recording:
                self.cells[name] = self.fmt.at(out.detach()).cell_id(out.detach())
            return out if self.quantize else None

        return hook

    @contextmanager
    def attached(self) -> Iterator[None]:
        modules = dict(self.module.named_modules())
        handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def record(self) -> Iterator[dict[str, Tensor]]:
        self.cells = {}
        self.recording = True
        try:
            yield self.cells
        finally:
            self.recording = False


def activation_changes(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
    """Per probed tensor: (elements whose cell changed, elements)."""
    out = {}
    for name, b in before.items():
        a = after.get(name)
        if a is None or a.shape != b.shape:
            continue
        out[name] = (int((a != b).sum()), b.numel())
    return out
