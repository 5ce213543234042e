"""Gradient capture: psi = ||P_S g|| / ||g||, and the best any rank-r update could do.

psi_star(r) = sqrt(sum_{i<=r} s_i^2 / sum_i s_i^2) over the singular values of the
gradient matrix G (Eckart-Young: the best rank-r approximation captures exactly the
top r singular values), and r_star(tau) the smallest rank with psi_star >= tau.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def singular_values(g: Tensor) -> Tensor:
    """Singular values of a gradient matrix (descending, float64), from the eigenvalues
    of its smaller Gram matrix: psi_star only needs the energies s_i^2, and eigvalsh of
    a min(m, n)-square float64 Gram is 1.3-4x faster than svdvals on CPU. Its error is
    ~eps * s_1^2 per energy, so cumulative energy fractions stay within ~1e-15; the
    smallest singular values lose relative accuracy, which no figure here reads."""
    m = g.detach().to(torch.float64)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0.0).sqrt()


def psi_star_curve(s: Tensor) -> Tensor:
    """psi_star(r) for r = 1..len(s) (cumulative captured energy, square-rooted)."""
    energy = s.square()
    total = float(energy.sum())
    if total == 0.0:
        return torch.zeros_like(s)
    return torch.sqrt(torch.cumsum(energy, 0) / total).clamp(max=1.0)


def psi_star_at(curve: Tensor, r: int) -> float:
    if r <= 0 or curve.numel() == 0:
        return 0.0
    return float(curve[min(r, curve.numel()) - 1])


def r_star(curve: Tensor, tau: float) -> int | None:
    """Smallest rank r with psi_star(r) >= tau (None for a zero gradient)."""
    if curve.numel() == 0 or float(curve[-1]) == 0.0:
        return None
    hits = torch.nonzero(curve >= tau - 1e-12)
    return int(hits[0]) + 1 if hits.numel() else int(curve.numel())


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out = [2**k for k in range(int(math.log2(n)) + 1)] if n >= 1 else []
    if n and out[-1] != n:
        out.append(n)
    return out
