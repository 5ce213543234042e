"""Per-tensor measurement: one pass over a tensor per planned format."""

from __future__ import annotations

import torch

from ..lattice import Format
from .tally import FormatTally, Tally, log2_histogram


@torch.no_grad()
def measure_tensor(w: torch.Tensor, formats: dict[str, Format], lr: float) -> Tally:
    """Tally one tensor against every planned format.

    Non-finite weights are counted and then left out of the format figures (they are
    a finding of their own, and one NaN would otherwise poison every ratio).
    """
    x = w.detach().to(torch.float32)  # shape kept: scaled formats group by channel/block
    finite = torch.isfinite(x)
    nonfinite = int(x.numel() - finite.sum())
    if nonfinite:
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    nonzero_mask = x != 0
    tally = Tally(params=w.numel(), nonfinite=nonfinite, zeros=int((~nonzero_mask & finite).sum()))
    n = w.numel() - nonfinite
    nonzero = int(nonzero_mask.sum())
    signal_sq = float(x.double().square().sum())
    absx = x.abs()
    for name, fmt in formats.items():
        lattice = fmt.at(x)
        q = lattice.quantize(x)
        ulp = lattice.ulp(x)
        err = q - x
        saturated = absx > lattice.max_abs(x)
        flushed = nonzero_mask & (q == 0)
        movable = ulp < 2.0 * lr  # lr > ulp/2
        if nonfinite:
            movable &= finite
            saturated &= finite
        hist = log2_histogram((ulp / absx)[nonzero_mask]) if nonzero else None
        ft = FormatTally(
            n=n,
            nonzero=nonzero,
            signal_sq=signal_sq,
            error_sq=float(err.double().square().sum()),
            saturated=int(saturated.sum()),
            flushed=int(flushed.sum()),
            movable=int(movable.sum()),
        )
        if hist is not None:
            ft.ulp_rel_hist = hist
        tally.formats[name] = ft
    return tally
