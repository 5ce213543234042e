"""Opt-in spectral figures of a weight matrix (`--spectral`): how many directions it uses."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def spectral_figures(w: torch.Tensor) -> dict[str, float | None]:
    """Stable rank ||W||_F^2/||W||_2^2 and effective rank exp(H(s/sum s)) (Roy & Vetterli).

    A k-D weight (conv) is viewed as (out, rest), the usual reading of its rank.
    Computed in float64 on one matrix at a time, so memory stays at one matrix.
    """
    if w.dim() < 2 or w.numel() == 0:
        return {"stable_rank": None, "effective_rank": None}
    m = w.detach().reshape(w.shape[0], -1).to(torch.float64)
    if not torch.isfinite(m).all():
        return {"stable_rank": None, "effective_rank": None}
    s = torch.linalg.svdvals(m)
    if float(s[0]) == 0.0:
        return {"stable_rank": 0.0, "effective_rank": 0.0}
    stable = float(s.square().sum() / s[0].square())
    p = s / s.sum()
    p = p[p > 0]
    effective = math.exp(float(-(p * p.log()).sum()))
    return {"stable_rank": stable, "effective_rank": effective}
