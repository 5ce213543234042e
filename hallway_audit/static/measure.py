"""Per-tensor measurement: one quantize and one ulp per planned format.

Written for throughput and bounded memory on large checkpoints:

* plain float formats (fp32 ... fp4) are elementwise, so the tensor is measured in
  chunks of CHUNK elements: every temporary stays cache-sized and peak memory is
  the tensor as read plus a few chunks. Scaled formats (int8/int4/nf4/mx/nvfp4)
  derive scales from whole channels, blocks or the tensor, so they are measured on
  the whole tensor at once;
* reductions use count_nonzero and float32 vector norms (bool .sum() and float64
  casts are several times slower on CPU);
* the ULP/|w| histogram reads a fixed-stride sample of at most HIST_SAMPLE weights
  per tensor (every weight for tensors up to that size).
"""

from __future__ import annotations

import functools
import math

import torch

from ..lattice import Format
from .tally import FormatTally, Tally, log2_histogram

HIST_SAMPLE = 1 << 20
CHUNK = 1 << 18


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _sq_norm(x: torch.Tensor) -> float:
    # float32 accumulation (pairwise in torch): ~1e-6 relative, which a relative
    # error or an SQNR in dB never shows; float64 would triple the audit's time.
    return float(torch.linalg.vector_norm(x)) ** 2


_BINADES = torch.tensor([2.0**e for e in range(-149, 128)], dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def movable_below(fmt: Format, lr: float) -> float:
    """For a plain float format: T such that ulp(w) < 2 lr exactly when |w| < T.

    ulp is constant within a binade [2^e, 2^(e+1)) and never decreases with |w|
    (zero and subnormals share the smallest binade's), so the weights an lr-sized
    step moves are those below the first binade whose ulp reaches 2 lr: one compare
    per weight instead of an ulp per weight.
    """
    ulps = fmt.ulp(_BINADES)
    reach = torch.nonzero(ulps >= 2.0 * lr)
    if not reach.numel():
        return math.inf
    first = int(reach[0])
    # Zero shares the smallest binade's ulp: if that one already reaches 2 lr, no
    # weight moves, zero included (a threshold of 2^-149 would let zero through).
    return 0.0 if first == 0 else float(_BINADES[first])


class _Part:
    """One slice of a tensor as float32, non-finite entries zeroed, with its basics."""

    def __init__(self, w: torch.Tensor, stride: int) -> None:
        x = w.to(torch.float32)
        self.finite: torch.Tensor | None = None
        self.nonfinite = 0
        if not torch.isfinite(x.sum()):  # one cheap reduction decides the common case
            self.finite = torch.isfinite(x)
            self.nonfinite = x.numel() - _count(self.finite)
            x = torch.where(self.finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        self.x = x
        self.absx = x.abs()
        self.zeros = x.numel() - _count(x)  # counts the zeroed non-finite entries too
        self.stride = stride
        self.sample = self.absx.reshape(-1)[::stride]
        self.sample_nz = self.sample != 0

    def tally(self, fmt: Format, lr: float) -> FormatTally:
        lattice = fmt.at(self.x)
        q = lattice.quantize(self.x)
        if fmt.scaled:  # per-element scales: ulp and range vary with the block
            ulp = lattice.ulp(self.x)
            saturated = self.absx > lattice.max_abs(self.x)
            movable = ulp < 2.0 * lr  # lr > ulp/2
            ulp_sample = ulp.reshape(-1)[:: self.stride]
        else:  # one lattice for every element: thresholds instead of per-weight ulps
            saturated = self.absx > fmt.max_finite
            movable = self.absx < movable_below(fmt, lr)
            ulp_sample = lattice.ulp(self.x.reshape(-1)[:: self.stride])
        if self.finite is not None:
            movable &= self.finite
            saturated &= self.finite
        n = self.x.numel() - self.nonfinite
        ft = FormatTally(
            n=n,
            nonzero=self.x.numel() - self.zeros,
            signal_sq=_sq_norm(self.x),
            error_sq=_sq_norm(q - self.x),
            saturated=_count(saturated),
            flushed=(q.numel() - _count(q)) - self.zeros,  # Q(0) = 0, so these were nonzero
            movable=_count(movable),
        )
        if ft.nonzero:
            ft.ulp_rel_hist = log2_histogram((ulp_sample / self.sample)[self.sample_nz])
        return ft


@torch.no_grad()
def measure_tensor(w: torch.Tensor, formats: dict[str, Format], lr: float) -> Tally:
    """Tally one tensor against every planned format.

    Non-finite weights are counted and then left out of the format figures (they are
    a finding of their own, and one NaN would otherwise poison every ratio).
    """
    w = w.detach()
    stride = max(1, w.numel() // HIST_SAMPLE)
    plain = {n: f for n, f in formats.items() if not f.scaled}
    scaled = {n: f for n, f in formats.items() if f.scaled}
    tally = Tally(params=w.numel())
    for name in formats:
        tally.formats[name] = FormatTally()
    flat = w.reshape(-1)
    # Chunks start at multiples of the stride, so the sample is the same as unchunked.
    chunk = max(CHUNK // stride, 1) * stride
    for start in range(0, max(flat.numel(), 1), chunk):
        part = _Part(flat[start : start + chunk], stride)
        tally.nonfinite += part.nonfinite
        tally.zeros += part.zeros - part.nonfinite
        for name, fmt in plain.items():
            tally.formats[name] += part.tally(fmt, lr)
    if scaled:
        whole = _Part(w, stride)  # channel/block scales need the tensor's shape
        for name, fmt in scaled.items():
            tally.formats[name] += whole.tally(fmt, lr)
    return tally
