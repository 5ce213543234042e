"""The static audit's work, fixed from the checkpoint's metadata before any tensor is read.

The audit adds each tensor's tally into its layer and the model in one fixed order,
and small tensors are measured together in batches; floating-point sums depend on
both. Planning them from names, dtypes and shapes alone (no data) lets any number
of processes measure any share of the units and still merge into exactly the result
of one process: every process computes the same plan, and the merge applies the
units in plan order (partial.Merger).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..checkpoint import TensorInfo, layer_name
from ..lattice import Format, get_format
from . import measure

_AUDITABLE = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def auditable(dtype: torch.dtype) -> bool:
    return dtype in _AUDITABLE or "float8" in str(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


UnitKind = Literal["skip", "alone", "batch"]


@dataclass(frozen=True)
class Unit:
    """One piece of work: a tensor that is not a float weight (skip), a tensor measured
    alone, or small tensors measured together (measure_many). `members` are indices
    into the plan's infos, ascending; `at` is where one process measures the unit:
    the index of its last member, or len(infos) for the batch left at the end."""

    kind: UnitKind
    members: tuple[int, ...]
    at: int


@dataclass
class StaticPlan:
    """Units in the order their tallies are added (the order one process finishes them),
    the layer of every tensor, and which tensor gives each layer its spectral figures."""

    infos: list[TensorInfo]
    formats: tuple[str, ...]  # canonical names, one per format given
    spectral: bool
    units: list[Unit]
    layer_of: list[str | None]  # per tensor; None for a tensor that is not audited
    spectral_pick: frozenset[int]  # per layer, its largest matrix (the first of equal size)
    batchable: bool  # every format is plain: small tensors are measured together
    small_numel: int
    chunk: int
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos)

    def format_objects(self) -> dict[str, Format]:
        return {name: get_format(name) for name in self.formats}

    def unit_bytes(self, uid: int) -> int:
        return sum(self.infos[i].nbytes for i in self.units[uid].members)

    def fingerprint(self) -> str:
        """A digest of everything the plan depends on: processes that opened the
        checkpoint separately check they planned the same work from the same files."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(repr((self.formats, self.spectral, self.small_numel, self.chunk, len(self.infos))).encode())
            for i in self.infos:
                h.update(repr((i.name, str(i.dtype), i.shape, i.nbytes, str(i.source))).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def shares(self, parts: int) -> list[list[int]]:
        """Unit ids split into `parts` runs of consecutive units of about equal bytes
        (some empty when there are fewer units than parts): each rank or process of a
        split audit measures one share (partial.audit_units), and merge_partials joins them."""
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        sizes = [self.unit_bytes(u) for u in range(len(self.units))]
        total = sum(sizes)
        out: list[list[int]] = [[] for _ in range(parts)]
        done = 0
        for uid, size in enumerate(sizes):
            # the share whose byte range holds this unit's midpoint
            k = min(parts - 1, int((done + size / 2) * parts // total)) if total else uid * parts // len(sizes)
            out[k].append(uid)
            done += size
        return out


def plan_static(infos: Sequence[TensorInfo], formats: Sequence[str], *, spectral: bool = False) -> StaticPlan:
    """The units of a static audit of `infos` (a checkpoint's infos(), in its order).

    Reproduces the single-pass loop's grouping: tensors are visited in order, small
    ones (up to measure.SMALL_NUMEL elements, every format plain) join a pending batch
    that is measured once it holds measure.CHUNK elements, and the rest at once.
    """
    infos = list(infos)
    # as the report lists them: one entry per format name given (aliases of one format stay apart)
    fmts = [get_format(name) for name in dict.fromkeys(formats)]
    names = tuple(f.name for f in fmts)
    batchable = not any(f.scaled for f in fmts)
    small, chunk = measure.SMALL_NUMEL, measure.CHUNK
    units: list[Unit] = []
    layer_of: list[str | None] = []
    largest: dict[str, tuple[int, int]] = {}  # layer -> (numel, index) of its spectral matrix
    pending: list[int] = []
    pending_numel = 0
    for i, info in enumerate(infos):
        if not auditable(info.dtype):
            layer_of.append(None)
            units.append(Unit("skip", (i,), i))
            continue
        name = layer_name(info.name)
        layer_of.append(name)
        numel = info.numel
        if spectral and len(info.shape) >= 2 and numel > largest.get(name, (0, -1))[0]:
            largest[name] = (numel, i)
        if batchable and numel <= small:
            pending.append(i)
            pending_numel += numel
            if pending_numel >= chunk:
                units.append(Unit("batch", tuple(pending), i))
                pending, pending_numel = [], 0
        else:
            units.append(Unit("alone", (i,), i))
    if pending:
        units.append(Unit("batch", tuple(pending), len(infos)))
    return StaticPlan(
        infos=infos,
        formats=names,
        spectral=spectral,
        units=units,
        layer_of=layer_of,
        spectral_pick=frozenset(i for _, i in largest.values()),
        batchable=batchable,
        small_numel=small,
        chunk=chunk,
    )
