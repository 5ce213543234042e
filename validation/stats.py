"""Spearman's rank correlation (ties: average ranks), confusion matrices, balanced accuracy.

scipy is not a dependency of the project; this is the textbook definition
(Pearson correlation of average ranks), which equals scipy.stats.spearmanr.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def average_ranks(xs: Sequence[float]) -> list[float]:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    if n < 3:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan  # a constant predictor ranks nothing
    return sxy / math.sqrt(sxx * syy)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, int]:
    """(rho, n) over the pairs where both values are finite."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if not pairs:
        return math.nan, 0
    px, py = zip(*pairs, strict=True)
    return pearson(average_ranks(px), average_ranks(py)), len(pairs)


def confusion(predicted: Sequence[bool | None], actual: Sequence[bool]) -> dict[str, float]:
    """Positive = trains. tp: passed & trains, fn: rejected & trains, fp: passed & stuck, tn: rejected & stuck."""
    c = {"tp": 0, "fn": 0, "fp": 0, "tn": 0, "missing": 0}
    for p, a in zip(predicted, actual, strict=True):
        if p is None:
            c["missing"] += 1
        elif a:
            c["tp" if p else "fn"] += 1
        else:
            c["fp" if p else "tn"] += 1
    return rates({k: float(v) for k, v in c.items()})


def rates(counts: dict[str, float]) -> dict[str, float]:
    """The counts with tpr, tnr and balanced accuracy (n/a terms dropped) added: one
    subject's confusion, or several subjects' counts summed."""
    tpr = counts["tp"] / (counts["tp"] + counts["fn"]) if counts["tp"] + counts["fn"] else math.nan
    tnr = counts["tn"] / (counts["tn"] + counts["fp"]) if counts["tn"] + counts["fp"] else math.nan
    parts = [r for r in (tpr, tnr) if math.isfinite(r)]
    return {**counts, "tpr": tpr, "tnr": tnr, "balanced_accuracy": sum(parts) / len(parts) if parts else math.nan}


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def spearman_bootstrap(predictors: Sequence[Sequence[float]], ys: Sequence[float], resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> list[tuple[float, float]]:
    """Percentile-bootstrap intervals of each predictor's Spearman rho against ys, resampling
    the settings (the same resample for every predictor, so their intervals are comparable),
    then one interval per later predictor k: predictors[0]'s rho minus predictors[k]'s,
    paired on each resample. A resample where a rho is undefined (a constant predictor)
    is skipped."""
    import random

    rng = random.Random(seed)
    n = len(ys)
    draws: list[list[float]] = [[] for _ in range(2 * len(predictors) - 1)]
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        rhos = [spearman([xs[i] for i in idx], [ys[i] for i in idx])[0] for xs in predictors]
        if not all(math.isfinite(r) for r in rhos):
            continue
        for k, r in enumerate([*rhos, *(rhos[0] - other for other in rhos[1:])]):
            draws[k].append(r)
    tail = (1 - level) / 2
    return [(_percentile(sorted(d), tail), _percentile(sorted(d), 1 - tail)) if d else (math.nan, math.nan)
            for d in draws]
