"""Additive tallies: per-tensor sums that add up exactly to layer and model figures.

Everything a report shows is a ratio of sums (or a quantile of a histogram), so a
layer's figures are the sum of its tensors' tallies and the model's the sum of its
layers' — no averaging of averages, and the checkpoint is visited once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# ulp(w)/|w| spans ~2^-24 (fp32) to far above 1 (tiny weights in a coarse scaled
# format). A log2 histogram with 1/32-octave bins keeps the median within 2.2% of
# the exact value at a fixed 12 KiB per tally, so layers and the model merge exactly.
HIST_LO, HIST_HI, HIST_PER_OCTAVE = -40, 24, 32
HIST_BINS = (HIST_HI - HIST_LO) * HIST_PER_OCTAVE


def log2_histogram(ratio: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of log2(ratio) in HIST_BINS bins (int64, on CPU); ratio must be > 0.
    `weights` (integer counts) say how many weights each ratio stands for."""
    idx = ((torch.log2(ratio) - HIST_LO) * HIST_PER_OCTAVE).floor_()
    idx = idx.clamp_(0, HIST_BINS - 1).to(torch.int64)
    if weights is None:
        return torch.bincount(idx.flatten(), minlength=HIST_BINS).cpu()
    # float64 sums of integer counts are exact below 2^53
    summed = torch.bincount(idx.flatten(), weights=weights.flatten().double(), minlength=HIST_BINS)
    return summed.round().to(torch.int64).cpu()


def histogram_median(counts: torch.Tensor) -> float | None:
    total = int(counts.sum())
    if total == 0:
        return None
    i = int(torch.searchsorted(torch.cumsum(counts, 0), (total + 1) // 2))
    return _bin_value(i)


def _bin_value(i: int) -> float:
    return 2.0 ** (HIST_LO + (i + 0.5) / HIST_PER_OCTAVE)


# A histogram with at most this many occupied bins is kept as a dict: a layer of a
# few small tensors then costs a few hundred bytes instead of 16 KiB, which is what
# keeps a checkpoint of 10^5 tiny tensors in bounded memory.
SPARSE_MAX = 64


class Histogram:
    """Counts of log2(ulp/|w|) in HIST_BINS bins that merge exactly: a dense int64
    tensor, a dict {bin: count} of few occupied bins, or both (their sum)."""

    __slots__ = ("_dense", "_sparse")

    def __init__(self) -> None:
        self._dense: torch.Tensor | None = None
        self._sparse: dict[int, int] = {}

    @classmethod
    def of(cls, counts: torch.Tensor) -> Histogram:
        """From a dense int64[HIST_BINS] tensor (taken over, not copied)."""
        h = cls()
        occupied = torch.nonzero(counts).flatten()
        if len(occupied) <= SPARSE_MAX:
            h._sparse = dict(zip(occupied.tolist(), counts[occupied].tolist(), strict=True))
        else:
            h._dense = counts.cpu()
        return h

    @classmethod
    def of_bins(cls, bins: dict[int, int]) -> Histogram:
        h = cls()
        h._sparse = bins
        return h

    def __iadd__(self, other: Histogram) -> Histogram:
        if other._dense is not None:
            self._dense = other._dense.clone() if self._dense is None else self._dense.add_(other._dense)
        if other._sparse:
            mine = self._sparse
            for k, v in other._sparse.items():
                mine[k] = mine.get(k, 0) + v
            if len(mine) > SPARSE_MAX:
                self._dense = self.dense()
                self._sparse = {}
        return self

    def dense(self) -> torch.Tensor:
        """The counts as a fresh int64[HIST_BINS] tensor."""
        out = torch.zeros(HIST_BINS, dtype=torch.int64) if self._dense is None else self._dense.clone()
        if self._sparse:
            idx = torch.tensor(list(self._sparse), dtype=torch.int64)
            out.index_add_(0, idx, torch.tensor(list(self._sparse.values()), dtype=torch.int64))
        return out

    def median(self) -> float | None:
        if self._dense is not None:
            return histogram_median(self.dense())
        total = sum(self._sparse.values())
        if total == 0:
            return None
        half, seen = (total + 1) // 2, 0
        for i in sorted(self._sparse):
            seen += self._sparse[i]
            if seen >= half:
                return _bin_value(i)
        raise AssertionError("unreachable: the counts sum to total")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass
class FormatTally:
    """What one number format does to a set of weights."""

    n: int = 0  # finite weights
    nonzero: int = 0
    signal_sq: float = 0.0  # sum w^2, float64
    error_sq: float = 0.0  # sum (Q(w) - w)^2
    saturated: int = 0  # |w| beyond the largest representable magnitude
    flushed: int = 0  # w != 0 but Q(w) == 0
    movable: int = 0  # lr > ulp(w)/2: an Adam-like step of size lr leaves the cell
    hist: Histogram = field(default_factory=Histogram, repr=False)  # ulp(w)/|w|, log2 bins
    # Reports read a layer's summary several times (rules, JSON, table): computed once
    # per state of the counts (the key), so assigning a field directly is still seen.
    _summary: tuple[tuple, dict[str, float | None]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ulp_rel_hist(self) -> torch.Tensor:
        """The ulp(w)/|w| histogram as int64[HIST_BINS] counts."""
        return self.hist.dense()

    @ulp_rel_hist.setter
    def ulp_rel_hist(self, counts: torch.Tensor) -> None:
        self.hist = Histogram.of(counts)
        self._summary = None

    def __iadd__(self, other: FormatTally) -> FormatTally:
        self.n += other.n
        self.nonzero += other.nonzero
        self.signal_sq += other.signal_sq
        self.error_sq += other.error_sq
        self.saturated += other.saturated
        self.flushed += other.flushed
        self.movable += other.movable
        self.hist += other.hist
        self._summary = None
        return self

    def summary(self) -> dict[str, float | None]:
        key = (self.n, self.nonzero, self.signal_sq, self.error_sq, self.saturated, self.flushed, self.movable, id(self.hist))
        if self._summary is not None and self._summary[0] == key:
            return dict(self._summary[1])
        rel = math.sqrt(self.error_sq / self.signal_sq) if self.signal_sq > 0 else None
        if rel is None:
            sqnr = None
        elif rel == 0.0:
            sqnr = math.inf
        else:
            sqnr = -20.0 * math.log10(rel)
        out = {
            "rel_error": rel,
            "sqnr_db": sqnr,
            "saturated": _ratio(self.saturated, self.n),
            "flushed": _ratio(self.flushed, self.nonzero),
            "beta_pred": _ratio(self.movable, self.n),
            "ulp_rel_median": self.hist.median(),
        }
        self._summary = (key, out)
        return dict(out)


@dataclass
class Tally:
    """Format-independent counts plus one FormatTally per planned format."""

    params: int = 0
    nonfinite: int = 0
    zeros: int = 0
    formats: dict[str, FormatTally] = field(default_factory=dict)

    def __iadd__(self, other: Tally) -> Tally:
        self.params += other.params
        self.nonfinite += other.nonfinite
        self.zeros += other.zeros
        for name, ft in other.formats.items():
            self.formats.setdefault(name, FormatTally())
            self.formats[name] += ft
        return self

    def basics(self) -> dict[str, float | int | None]:
        return {
            "params": self.params,
            "nonfinite": self.nonfinite,
            "nonfinite_frac": _ratio(self.nonfinite, self.params),
            "zero_frac": _ratio(self.zeros, self.params),
        }
