"""Per-tensor measurement: one quantize and one ulp per planned format.

Written for throughput and bounded memory on large checkpoints (bench/static_throughput.py):

* plain float formats (fp32 ... fp4) are elementwise, so the tensor is measured in
  chunks of CHUNK elements: every temporary stays cache-sized (a fresh tensor-sized
  temporary costs more in page faults than the arithmetic on it) and peak memory is
  the tensor as read plus a few chunks. Scaled formats (int8/int4/nf4/mx/nvfp4)
  derive scales from whole channels, blocks or the tensor, so they are measured on
  the whole tensor at once;
* figures every format shares (zeros, non-finite count, sum of squares, the largest
  magnitude) are taken once per chunk, and whole passes are skipped when the answer
  is known exactly: a format that holds every value of the stored dtype (bf16 weights
  in bf16) has no error, flush or saturation; nothing saturates below max finite;
  every weight moves when the largest is below the movable threshold;
* reductions use count_nonzero and float32 vector norms (bool .sum() and float64
  casts are several times slower on CPU);
* 16-bit tensors (bf16, fp16: most checkpoints) are not quantized element by element
  at all: one pass counts how often each of the 65536 bit patterns occurs, and every
  plain format's figures follow exactly from the 65536 values weighted by their
  counts, whatever the number of formats (the ULP histogram then covers every
  weight, not a sample);
* otherwise the ULP/|w| histogram reads a fixed-stride sample of at most
  HIST_SAMPLE weights per tensor (every weight for tensors up to that size): its
  median has a resolution of 1/32 octave, far coarser than the sample's error.
"""

from __future__ import annotations

import functools
import math

import torch

from ..lattice import Format
from .tally import HIST_BINS, HIST_LO, HIST_PER_OCTAVE, FormatTally, Histogram, Tally, log2_histogram

HIST_SAMPLE = 1 << 16
CHUNK = 1 << 18
PATTERN_MIN = 1 << 16  # 16-bit tensors from this size are tallied by bit pattern
_PATTERN_CHUNK = 1 << 22  # bincount has a high fixed cost per call


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _sq_norm(x: torch.Tensor) -> float:
    # float32 accumulation (pairwise in torch): ~1e-6 relative, which a relative
    # error or an SQNR in dB never shows; float64 would triple the audit's time.
    # Weights near float32's max overflow a float32 norm: then float64 it is.
    norm = float(torch.linalg.vector_norm(x))
    if math.isinf(norm):
        norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
    return norm**2


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


@functools.lru_cache(maxsize=8)
def _pattern_values(dtype: torch.dtype) -> torch.Tensor:
    """float32 value of every bit pattern of an 8- or 16-bit float dtype, indexed by the
    pattern read as unsigned."""
    bits = torch.finfo(dtype).bits
    patterns = torch.arange(2**bits, dtype=torch.int32)
    if bits == 16:
        patterns = torch.where(patterns >= 2**15, patterns - 2**16, patterns)
    return patterns.to(torch.int16 if bits == 16 else torch.uint8).view(dtype).to(torch.float32)


@functools.lru_cache(maxsize=64)
def holds_every_value(fmt: Format, dtype: torch.dtype) -> bool:
    """True when a plain format represents every finite value of `dtype` exactly.

    Then Q(w) = w for every stored weight: no error, no flush, no saturation, and the
    quantize pass can be skipped. Decided by enumeration for dtypes up to 16 bits;
    float32 (and float64, which the audit reads as float32) only fits a format
    with float32's own lattice.
    """
    if fmt.scaled:
        return False
    if torch.finfo(dtype).bits > 16:
        values = torch.tensor([2.0**-149, 2.0**-126 * (1 + 2.0**-23), 1 + 2.0**-23, torch.finfo(torch.float32).max])
    else:
        values = _pattern_values(dtype)
        values = values[torch.isfinite(values)]
    return bool(torch.equal(fmt.at(values).quantize(values), values))


class _Part:
    """One slice of a tensor as float32, non-finite entries zeroed, with the figures
    every format shares."""

    def __init__(self, w: torch.Tensor, stride: int) -> None:
        x = w.to(torch.float32)
        self.dtype = w.dtype
        self.finite: torch.Tensor | None = None
        self.nonfinite = 0
        if x.numel():
            lo, hi = (float(v) for v in torch.aminmax(x))  # one pass: finiteness and range
            if not (math.isfinite(lo) and math.isfinite(hi)):
                self.finite = torch.isfinite(x)
                self.nonfinite = x.numel() - _count(self.finite)
                x = torch.where(self.finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
                lo, hi = (float(v) for v in torch.aminmax(x))
            self.amax = max(-lo, hi)
        else:
            self.amax = 0.0
        self.x = x
        self._absx: torch.Tensor | None = None
        self.zeros = x.numel() - _count(x)  # counts the zeroed non-finite entries too
        self.signal_sq = _sq_norm(x)
        self.stride = stride
        self.sample = x.reshape(-1)[::stride].abs()
        self.sample_nz = self.sample != 0

    @property
    def absx(self) -> torch.Tensor:
        if self._absx is None:
            self._absx = self.x.abs()
        return self._absx

    def _movable(self, fmt: Format, lr: float) -> int:
        """Finite weights with lr > ulp/2 (plain formats: |w| below one threshold)."""
        below = movable_below(fmt, lr)
        if below == 0.0:
            return 0
        n = self.x.numel() - self.nonfinite
        if self.amax < below:
            return n
        return _count(self.absx < below) - self.nonfinite  # zeroed non-finite entries are below

    def tally(self, fmt: Format, lr: float) -> FormatTally:
        numel = self.x.numel()
        ft = FormatTally(n=numel - self.nonfinite, nonzero=numel - self.zeros, signal_sq=self.signal_sq)
        lattice = fmt.at(self.x)
        if fmt.scaled:  # per-element scales: ulp and range vary with the block
            q = lattice.quantize(self.x)
            ulp = lattice.ulp(self.x)
            saturated = lattice.saturated(self.x)
            movable = ulp < 2.0 * lr  # lr > ulp/2
            if self.finite is not None:
                movable &= self.finite
                saturated &= self.finite
            ft.error_sq = _sq_norm(q - self.x)
            ft.saturated = _count(saturated)
            ft.flushed = (numel - _count(q)) - self.zeros  # Q(0) = 0, so these were nonzero
            ft.movable = _count(movable)
            ulp_sample = ulp.reshape(-1)[:: self.stride]
        else:  # one lattice for every element: thresholds instead of per-weight ulps
            if not holds_every_value(fmt, self.dtype):
                q = lattice.quantize(self.x)
                ft.error_sq = _sq_norm(q - self.x)
                ft.flushed = (numel - _count(q)) - self.zeros
                if self.amax >= fmt.grid.overflow_bound()[0]:  # zeroed non-finite entries never count
                    ft.saturated = _count(fmt.grid.overflows(self.absx))
            ft.movable = self._movable(fmt, lr)
            ulp_sample = lattice.ulp(self.sample)
        if ft.nonzero:
            ft.ulp_rel_hist = log2_histogram((ulp_sample / self.sample)[self.sample_nz])
        return ft


def pattern_counts(flat: torch.Tensor) -> torch.Tensor:
    """How often each 16-bit pattern occurs in a flat 16-bit tensor, or in the high
    halves of a float32 one (int64[65536])."""
    counts = torch.zeros(2**16, dtype=torch.int64, device=flat.device)
    for chunk in flat.split(_PATTERN_CHUNK):
        if chunk.dtype == torch.float32:
            patterns = (chunk.view(torch.int32) >> 16) & 0xFFFF
        else:
            patterns = chunk.view(torch.int16).to(torch.int32) & 0xFFFF
        counts += torch.bincount(patterns, minlength=2**16)
    return counts


def _pattern_tally(counts: torch.Tensor, dtype: torch.dtype, formats: dict[str, Format], lr: float, tally: Tally) -> None:
    """Every figure of the plain `formats` from a tensor's bit-pattern counts: each
    distinct value is quantized once and weighted by how often it occurs."""
    seen = torch.nonzero(counts).flatten()
    count = counts[seen]
    value = _pattern_values(dtype).to(counts.device)[seen]
    finite = torch.isfinite(value)
    tally.nonfinite += int(count[~finite].sum())
    count, value = count[finite], value[finite]
    n = int(count.sum())
    zeros = int(count[value == 0].sum())
    tally.zeros += zeros
    weight, exact = count.double(), value.double()
    signal_sq = float((weight * exact.square()).sum())
    nonzero = value != 0
    magnitude = value.abs()
    for name, fmt in formats.items():
        q = fmt.at(value).quantize(value)
        ft = FormatTally(
            n=n,
            nonzero=n - zeros,
            signal_sq=signal_sq,
            error_sq=float((weight * (q.double() - exact).square()).sum()),
            saturated=int(count[fmt.grid.overflows(magnitude)].sum()),
            flushed=int(count[(q == 0) & nonzero].sum()),
            movable=int(count[magnitude < movable_below(fmt, lr)].sum()),
        )
        if ft.nonzero:
            ratio = fmt.ulp(value[nonzero]) / magnitude[nonzero]
            ft.ulp_rel_hist = log2_histogram(ratio, weights=count[nonzero])
        tally.formats[name] += ft


def _pattern_dtype(flat: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype whose patterns the tensor's values are: its own (bf16, fp16),
    or bf16 for a float32 tensor whose low 16 bits are all zero (bf16 weights saved
    upcast: each value is exactly the bf16 pattern of its high half). A probe of the
    first 4096 weights rules out ordinary float32 tensors at no cost."""
    if flat.dtype in (torch.bfloat16, torch.float16):
        return flat.dtype
    if flat.dtype != torch.float32:
        return None
    bits = flat.view(torch.int32)
    if bool(torch.count_nonzero(bits[:4096] & 0xFFFF)):
        return None
    if any(bool(torch.count_nonzero(chunk & 0xFFFF)) for chunk in bits.split(CHUNK)):
        return None
    return torch.bfloat16


@torch.no_grad()
def measure_tensor(w: torch.Tensor, formats: dict[str, Format], lr: float, *, by_pattern: bool | None = None) -> Tally:
    """Tally one tensor against every planned format.

    Non-finite weights are counted and then left out of the format figures (they are
    a finding of their own, and one NaN would otherwise poison every ratio).
    `by_pattern` allows (True) or forbids (False) the bit-pattern path for 16-bit
    tensors and float32 tensors of bf16 values; by default it is taken from
    PATTERN_MIN elements on.
    """
    w = w.detach()
    stride = max(1, w.numel() // HIST_SAMPLE)
    plain = {n: f for n, f in formats.items() if not f.scaled}
    scaled = {n: f for n, f in formats.items() if f.scaled}
    tally = Tally(params=w.numel())
    for name in formats:
        tally.formats[name] = FormatTally()
    flat = w.reshape(-1)
    if by_pattern is None:
        by_pattern = w.numel() >= PATTERN_MIN
    pattern_dtype = _pattern_dtype(flat) if by_pattern and plain else None
    if pattern_dtype is not None:
        _pattern_tally(pattern_counts(flat), pattern_dtype, plain, lr, tally)
    else:
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


# Tensors up to this size are measured together (measure_many): below it the fixed
# cost of ~30 small torch calls per tensor and format, not the arithmetic, is the time.
SMALL_NUMEL = 4096


def _per_segment(seg: torch.Tensor, mask: torch.Tensor, k: int) -> list[int]:
    """How many elements of each of k segments the boolean mask selects."""
    return torch.bincount(seg[mask], minlength=k).tolist()


def _sum_per_segment(seg: torch.Tensor, values: torch.Tensor, k: int) -> list[float]:
    return torch.zeros(k, dtype=torch.float64, device=values.device).index_add_(0, seg, values.double()).tolist()


def _histograms(seg: torch.Tensor, ratio: torch.Tensor, k: int) -> list[dict[int, int]]:
    """Each segment's log2(ratio) histogram as {bin: count}, binned as log2_histogram does."""
    idx = ((torch.log2(ratio) - HIST_LO) * HIST_PER_OCTAVE).floor_().clamp_(0, HIST_BINS - 1).to(torch.int64)
    keys, counts = torch.unique(seg * HIST_BINS + idx, return_counts=True)
    out: list[dict[int, int]] = [{} for _ in range(k)]
    for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
        out[key // HIST_BINS][key % HIST_BINS] = count
    return out


@torch.no_grad()
def measure_many(tensors: list[torch.Tensor], formats: dict[str, Format], lr: float) -> list[Tally]:
    """measure_tensor of each of many small tensors, with one pass per format over all of them.

    The tallies are the ones measure_tensor gives (counts and histograms exactly; sums
    of squares accumulate in float64 here, so they agree to float32 rounding). Only
    plain formats (the lattice does not depend on the tensor) and tensors of at most
    SMALL_NUMEL elements, which measure_tensor histograms element by element.
    """
    if any(f.scaled for f in formats.values()):
        raise ValueError("measure_many takes plain formats only (scaled formats derive scales per tensor)")
    if any(t.numel() > SMALL_NUMEL for t in tensors):
        raise ValueError(f"measure_many takes tensors of at most {SMALL_NUMEL} elements")
    k = len(tensors)
    if k == 0:
        return []
    sizes = [t.numel() for t in tensors]
    device = tensors[0].device
    x = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    seg = torch.repeat_interleave(torch.arange(k, device=device), torch.tensor(sizes, device=device))
    finite = torch.isfinite(x)
    nonfinite = _per_segment(seg, ~finite, k)
    x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=device))
    absx = x.abs()
    nz = x != 0
    nonzero = _per_segment(seg, nz, k)
    signal_sq = _sum_per_segment(seg, x.double().square(), k)
    seg_nz, abs_nz = seg[nz], absx[nz]
    tallies = [
        Tally(params=n, nonfinite=bad, zeros=n - bad - nnz)
        for n, bad, nnz in zip(sizes, nonfinite, nonzero, strict=True)
    ]
    for name, fmt in formats.items():
        lattice = fmt.at(x)
        q = lattice.quantize(x)
        error_sq = _sum_per_segment(seg, (q - x).double().square(), k)
        flushed = _per_segment(seg, (q == 0) & nz, k)
        saturated = _per_segment(seg, fmt.grid.overflows(absx), k)
        below = movable_below(fmt, lr)
        movable = _per_segment(seg, (absx < below) & finite, k) if below > 0.0 else [0] * k
        hists = _histograms(seg_nz, lattice.ulp(abs_nz) / abs_nz, k)
        for i, tally in enumerate(tallies):
            n = sizes[i] - nonfinite[i]
            tally.formats[name] = FormatTally(
                n=n,
                nonzero=nonzero[i],
                signal_sq=signal_sq[i],
                error_sq=error_sq[i],
                saturated=saturated[i],
                flushed=flushed[i],
                movable=movable[i],
                hist=Histogram.of_bins(hists[i]),
            )
    return tallies
