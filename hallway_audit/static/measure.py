"""Per-tensor measurement: one quantize and one ulp per planned format.

Written for throughput on large checkpoints: reductions use count_nonzero and
float32 vector norms (bool .sum() and float64 casts are several times slower on
CPU), and the ULP/|w| histogram reads a fixed-stride sample of at most
HIST_SAMPLE weights per tensor (every weight for tensors up to that size).
"""

from __future__ import annotations

import torch

from ..lattice import Format
from .tally import FormatTally, Tally, log2_histogram

HIST_SAMPLE = 1 << 20


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _sq_norm(x: torch.Tensor) -> float:
    # float32 accumulation (pairwise in torch): ~1e-6 relative, which a relative
    # error or an SQNR in dB never shows; float64 would triple the audit's time.
    return float(torch.linalg.vector_norm(x)) ** 2


@torch.no_grad()
def measure_tensor(w: torch.Tensor, formats: dict[str, Format], lr: float) -> Tally:
    """Tally one tensor against every planned format.

    Non-finite weights are counted and then left out of the format figures (they are
    a finding of their own, and one NaN would otherwise poison every ratio).
    """
    x = w.detach().to(torch.float32)  # shape kept: scaled formats group by channel/block
    nonfinite = 0
    finite = None
    if not torch.isfinite(x.sum()):  # one cheap reduction decides the common case
        finite = torch.isfinite(x)
        nonfinite = x.numel() - _count(finite)
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    zeros = x.numel() - _count(x)  # includes the zeroed non-finite entries
    tally = Tally(params=w.numel(), nonfinite=nonfinite, zeros=zeros - nonfinite)
    n = w.numel() - nonfinite
    nonzero = x.numel() - zeros
    signal_sq = _sq_norm(x)
    absx = x.abs()
    stride = max(1, x.numel() // HIST_SAMPLE)
    sample = absx.reshape(-1)[::stride]
    sample_nz = sample != 0
    for name, fmt in formats.items():
        lattice = fmt.at(x)
        q = lattice.quantize(x)
        ulp = lattice.ulp(x)
        saturated = absx > lattice.max_abs(x)
        movable = ulp < 2.0 * lr  # lr > ulp/2
        if finite is not None:
            movable &= finite
            saturated &= finite
        ft = FormatTally(
            n=n,
            nonzero=nonzero,
            signal_sq=signal_sq,
            error_sq=_sq_norm(q - x),
            saturated=_count(saturated),
            flushed=(q.numel() - _count(q)) - zeros,  # Q(0) = 0, so these were nonzero
            movable=_count(movable),
        )
        if nonzero:
            ulp_sample = ulp.reshape(-1)[::stride]
            ft.ulp_rel_hist = log2_histogram((ulp_sample / sample)[sample_nz])
        tally.formats[name] = ft
    return tally
