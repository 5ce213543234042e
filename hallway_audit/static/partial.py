"""Partial static audits and their merge: the same result from any split of the work.

A partial holds, per unit of the plan it measured, each tensor's tally and any
spectral figures. Merging applies the units in plan order, adding tensor by tensor
exactly as one process does, so the merged StaticResult equals the single-process
one bit for bit (float sums included) however the units were split: across
--jobs worker processes, or across torchrun ranks.

Partials travel between processes as plain data (to_plain / from_plain: ints,
floats, strings, lists, dicts; JSON-safe, histograms as base64), never as pickled
objects, so the receiving side can load them as JSON or with a pickle that refuses
every class (loads_plain).
"""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .plan import StaticPlan, dtype_name
from .result import LayerResult, StaticResult, TensorEntry
from .tally import HIST_BINS, FormatTally, Histogram, Tally

Figures = dict[str, float | None]


@dataclass
class UnitResult:
    """What measuring one unit gave: (tensor index, tally) in member order, and the
    spectral figures of any member the plan picked for its layer."""

    uid: int
    tallies: list[tuple[int, Tally]] = field(default_factory=list)
    spectral: dict[int, Figures] = field(default_factory=dict)


@dataclass
class StaticPartial:
    """Some units of one plan, measured at one lr. `fingerprint` ties it to that plan;
    `plan` is the plan itself where it was measured (None once sent as plain data:
    the merging side plans the same checkpoint itself)."""

    fingerprint: str
    lr: float
    units: dict[int, UnitResult] = field(default_factory=dict)
    plan: StaticPlan | None = field(default=None, repr=False, compare=False)

    def to_plain(self) -> tuple[Any, ...]:
        """Plain, JSON-safe data (json.dumps, or dumps_plain / loads_plain); from_plain reads it back."""
        return self.fingerprint, self.lr, [unit_to_plain(u) for u in self.units.values()]

    @classmethod
    def from_plain(cls, data: Any) -> StaticPartial:
        fingerprint, lr, units = data
        return cls(str(fingerprint), float(lr), {u.uid: u for u in map(unit_from_plain, units)})


# --- plain data ------------------------------------------------------------------------


def _hist_to_plain(h: Histogram) -> tuple[str | None, dict[int, int]]:
    dense = h._dense
    packed = None if dense is None else base64.b64encode(dense.contiguous().numpy().astype("<i8").tobytes()).decode()
    return packed, dict(h._sparse)


def _hist_from_plain(data: Any) -> Histogram:
    dense, sparse = data
    h = Histogram()
    if dense is not None:
        raw = base64.b64decode(dense, validate=True)
        if len(raw) != HIST_BINS * 8:
            raise ValueError(f"a dense histogram has {HIST_BINS} int64 bins, got {len(raw)} bytes")
        h._dense = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
    h._sparse = {int(k): int(v) for k, v in sparse.items()}
    return h


def tally_to_plain(t: Tally) -> tuple[Any, ...]:
    fmts = [
        (name, f.n, f.nonzero, f.signal_sq, f.error_sq, f.saturated, f.flushed, f.movable, _hist_to_plain(f.hist))
        for name, f in t.formats.items()
    ]
    return t.params, t.nonfinite, t.zeros, fmts


def tally_from_plain(data: Any) -> Tally:
    params, nonfinite, zeros, fmts = data
    t = Tally(params=int(params), nonfinite=int(nonfinite), zeros=int(zeros))
    for name, n, nonzero, signal_sq, error_sq, saturated, flushed, movable, hist in fmts:
        t.formats[str(name)] = FormatTally(
            n=int(n), nonzero=int(nonzero), signal_sq=float(signal_sq), error_sq=float(error_sq),
            saturated=int(saturated), flushed=int(flushed), movable=int(movable), hist=_hist_from_plain(hist),
        )
    return t


def unit_to_plain(u: UnitResult) -> tuple[Any, ...]:
    return u.uid, [(i, tally_to_plain(t)) for i, t in u.tallies], dict(u.spectral)


def unit_from_plain(data: Any) -> UnitResult:
    uid, tallies, spectral = data
    return UnitResult(int(uid), [(int(i), tally_from_plain(t)) for i, t in tallies],
                      {int(i): dict(f) for i, f in spectral.items()})


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"plain data only: refusing {module}.{name}")


def dumps_plain(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads_plain(data: bytes) -> Any:
    """Load what dumps_plain wrote; any class or function reference is refused."""
    return _PlainUnpickler(io.BytesIO(data)).load()


# --- the merge -----------------------------------------------------------------------------


class Merger:
    """Adds unit results into layers and the model in plan order, whatever order they
    arrive in (early arrivals wait, so memory holds at most the units in flight)."""

    def __init__(self, plan: StaticPlan, lr: float) -> None:
        self.plan = plan
        self.lr = lr
        self.layers: dict[str, LayerResult] = {}
        self.skipped: list[tuple[str, str]] = []
        for info, name in zip(plan.infos, plan.layer_of, strict=True):
            if name is None:
                self.skipped.append((info.name, f"{dtype_name(info.dtype)} tensor: not a float weight"))
                continue
            layer = self.layers.get(name)
            if layer is None:
                layer = self.layers[name] = LayerResult(name)
            layer.tensors.append(TensorEntry(info.name, dtype_name(info.dtype), tuple(info.shape)))
        self.model = Tally(formats={name: FormatTally() for name in plan.formats})
        self.next = 0
        self._waiting: dict[int, UnitResult] = {}

    def add(self, result: UnitResult) -> None:
        if result.uid < self.next or result.uid in self._waiting or not 0 <= result.uid < len(self.plan.units):
            raise ValueError(f"unit {result.uid} merged twice or not in the plan")
        self._waiting[result.uid] = result
        while self.next in self._waiting:
            self._apply(self._waiting.pop(self.next))
            self.next += 1

    def _apply(self, result: UnitResult) -> None:
        members = self.plan.units[result.uid].members
        if [i for i, _ in result.tallies] != [i for i in members if self.plan.layer_of[i] is not None]:
            raise ValueError(f"unit {result.uid}: the tallies do not match the unit's tensors")
        for i, tally in result.tallies:
            layer = self.layers[self.plan.layer_of[i]]  # type: ignore[index]
            layer.tally += tally
            self.model += tally
        for i, figures in result.spectral.items():
            layer = self.layers[self.plan.layer_of[i]]  # type: ignore[index]
            layer.spectral = figures
            layer._spectral_numel = self.plan.infos[i].numel

    @property
    def complete(self) -> bool:
        return self.next == len(self.plan.units)

    def result(self, seconds: float) -> StaticResult:
        if not self.complete:
            raise ValueError(f"units {self.next} to {len(self.plan.units) - 1} of the plan were not merged")
        if self.plan.spectral:
            for layer in self.layers.values():
                if layer.spectral is None:
                    layer.spectral = {"stable_rank": None, "effective_rank": None}
        return StaticResult(
            formats=list(self.plan.formats),
            lr=self.lr,
            layers=list(self.layers.values()),
            model=self.model,
            skipped=self.skipped,
            spectral=self.plan.spectral,
            bytes_read=self.plan.total_bytes,
            seconds=seconds,
        )


def merge_partials(
    partials: Iterable[StaticPartial], plan: StaticPlan | None = None, *, seconds: float = 0.0
) -> StaticResult:
    """The StaticResult of partials that together cover every unit of one plan once.

    Equal to measuring the whole checkpoint in one process (run_static with jobs=1).
    `plan`: the plan they share; by default the first partial's own (a partial that
    came as plain data has none). Raises ValueError for partials of different plans
    (another checkpoint, other formats, --spectral, lr) or units missing or measured twice.
    """
    partials = list(partials)
    if plan is None:
        plan = next((p.plan for p in partials if p.plan is not None), None)
        if plan is None:
            raise ValueError("merge_partials: no partial carries its plan; pass plan=plan_static(...)")
    if not partials:
        raise ValueError("merge_partials: no partials")
    lr = partials[0].lr
    merger = Merger(plan, lr)
    units: dict[int, UnitResult] = {}
    for part in partials:
        if part.fingerprint != plan.fingerprint() or part.lr != lr:
            raise ValueError("a partial static audit of another plan (another checkpoint, formats, --spectral or lr)")
        for uid, unit in part.units.items():
            if uid in units:
                raise ValueError(f"unit {uid} is in two partials")
            units[uid] = unit
    missing = [u for u in range(len(plan.units)) if u not in units]
    if missing:
        raise ValueError(f"{len(missing)} of {len(plan.units)} units are in no partial (the first: {missing[0]})")
    for uid in range(len(plan.units)):
        merger.add(units.pop(uid))
    return merger.result(seconds)
