"""The static audit: every tensor of a checkpoint against the planned number formats.

Streams the checkpoint one tensor at a time, so peak memory is about the largest
tensor (times the few float32 temporaries one format needs), whatever the
checkpoint's size. The work is planned first from the metadata (plan.py); one
process measures every unit here (measure_units), or --jobs processes share them
(parallel.py), or torchrun ranks do (audit_units + partial.merge_partials): the
merge gives the same result in every case.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import limits
from ..checkpoint import Checkpoint, TensorInfo
from ..checkpoint.base import shown
from ..errors import ResourceError
from .measure import SMALL_NUMEL, measure_many, measure_tensor
from .partial import Merger, StaticPartial, UnitResult
from .plan import StaticPlan, dtype_name, plan_static
from .result import StaticResult
from .spectral import spectral_figures

__all__ = ["SMALL_NUMEL", "Progress", "audit_tensors", "audit_units", "dtype_name", "measure_units", "run_static"]

# progress(bytes_done, bytes_total, tensor_name)
Progress = Callable[[int, int, str], None]


# Tensors from this size are checked against the memory they will need (psutil per call).
_CHECK_FROM = 1 << 20
# float32 tensor-sized temporaries: scaled formats measure the whole tensor at once
# (the copy, |w|, Q(w), ulp, Q(w) - w); singular values need about three copies.
_SCALED_COPIES, _SPECTRAL_COPIES = 5, 3


def _check_fits(info: TensorInfo, *, scaled: bool, spectral: bool, device: str | torch.device) -> None:
    """Refuse (exit 6) a tensor whose measurement cannot fit, before reading it.

    Plain formats are measured in cache-sized chunks of the memory-mapped tensor and
    need no tensor-sized memory; scaled formats and --spectral do."""
    copies = (_SCALED_COPIES if scaled else 0) + (_SPECTRAL_COPIES if spectral and len(info.shape) >= 2 else 0)
    dev = torch.device(device)
    need = info.numel * 4 * copies + (info.nbytes if dev.type != "cpu" else 0)
    if need == 0:
        return
    available, source = limits.available_memory(dev)
    if need > available:
        why = ", ".join(w for w, on in (("scaled formats", scaled), ("--spectral", spectral)) if on) or "the copy to the device"
        raise ResourceError(
            f"{shown(info.source)}: tensor {info.name!r} ({limits.count(info.numel)} elements) needs about "
            f"{limits.nbytes_text(need)} to measure ({why}); {limits.nbytes_text(available)} {source} "
            f"(set {limits.MEMORY_ENV} to override)"
        )


@dataclass
class Cursor:
    """Where measure_units is: the index of the tensor it reads, or where the unit it
    measures would be measured by one process (Unit.at). The first error of a split
    audit is the one at the smallest position, as one process would have met it."""

    at: int = -1


def measure_units(
    checkpoint: Checkpoint,
    plan: StaticPlan,
    unit_ids: Iterable[int],
    lr: float,
    *,
    device: str | torch.device = "cpu",
    on_tensor: Callable[[int], None] | None = None,
    cursor: Cursor | None = None,
    spectral_threads: int | None = None,
) -> Iterator[UnitResult]:
    """Measure the units `unit_ids` of `plan`, reading their tensors in checkpoint order.

    Yields each unit's result once measured (a batch once its last member is read);
    `on_tensor(index)` is called before each tensor. Small tensors are measured
    together when every format is plain, so a checkpoint of 10^5 tiny tensors costs a
    few vectorised passes instead of 10^5 x 30 small torch calls; the figures are the
    same as measuring each alone. `spectral_threads`: the torch threads the SVDs run
    on (LAPACK's singular values change in the last bits with the thread count, so a
    split audit computes them on as many threads as one process would).
    """
    fmts = {f.name: f for f in plan.format_objects().values()}
    cursor = cursor if cursor is not None else Cursor()
    unit_of: dict[int, int] = {}
    for uid in unit_ids:
        for i in plan.units[uid].members:
            unit_of[i] = uid
    pending: dict[int, list[tuple[int, torch.Tensor]]] = {}
    figures: dict[int, dict[int, dict[str, float | None]]] = {}
    deferred: list[int] = []
    end = len(plan.infos)

    def measure_batch(uid: int) -> UnitResult:
        group = pending.pop(uid)
        tallies = measure_many([w for _, w in group], fmts, lr)
        return UnitResult(uid, [(i, t) for (i, _), t in zip(group, tallies, strict=True)], figures.pop(uid, {}))

    for i in sorted(unit_of):
        cursor.at = i
        if on_tensor is not None:
            on_tensor(i)
        uid = unit_of[i]
        unit = plan.units[uid]
        if unit.kind == "skip":
            yield UnitResult(uid)
            continue
        info = plan.infos[i]
        picked = i in plan.spectral_pick
        if info.numel >= _CHECK_FROM:
            _check_fits(info, scaled=not plan.batchable, spectral=picked, device=device)
        w = checkpoint.read(info.name).to(device)
        if picked:
            figures.setdefault(uid, {})[i] = _spectral(w, spectral_threads)
        if unit.kind == "alone":
            result = UnitResult(uid, [(i, measure_tensor(w, fmts, lr))], figures.pop(uid, {}))
            del w
            yield result
            continue
        group = pending.setdefault(uid, [])
        group.append((i, w.clone()))  # a view would keep its whole shard mapped (and resident) until the batch is measured
        del w
        if len(group) == len(unit.members):
            if unit.at == end:  # one process measures the last batch after every tensor
                deferred.append(uid)
            else:
                yield measure_batch(uid)
    for uid in deferred:
        cursor.at = end
        yield measure_batch(uid)


def _spectral(w: torch.Tensor, threads: int | None) -> dict[str, float | None]:
    if threads is None or threads == torch.get_num_threads():
        return spectral_figures(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return spectral_figures(w)
    finally:
        torch.set_num_threads(before)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset or a container sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_static(
    checkpoint: Checkpoint,
    formats: Sequence[str],
    lr: float,
    *,
    spectral: bool = False,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    jobs: int = 1,
) -> StaticResult:
    """Every float tensor of `checkpoint` against `formats`, per layer and for the model.

    `jobs` > 1 measures in that many processes (parallel.py) when it pays: a CPU
    audit of a safetensors checkpoint of at least parallel.parallel_from_bytes; the
    result is the same as with jobs=1.
    """
    start = time.perf_counter()
    plan = plan_static(checkpoint.infos(), formats, spectral=spectral)
    if jobs > 1:
        from .parallel import parallel_jobs, run_parallel

        n = parallel_jobs(checkpoint, plan, jobs, device)
        if n > 1:
            return run_parallel(checkpoint, plan, lr, jobs=n, device=device, progress=progress)
    merger = Merger(plan, lr)
    total = plan.total_bytes
    done = 0

    def on_tensor(i: int) -> None:
        nonlocal done
        if progress is not None:
            progress(done, total, plan.infos[i].name)
        done += plan.infos[i].nbytes

    for result in measure_units(checkpoint, plan, range(len(plan.units)), lr, device=device, on_tensor=on_tensor):
        merger.add(result)
    if progress is not None:
        progress(total, total, "")
    return merger.result(time.perf_counter() - start)


def audit_units(
    checkpoint: Checkpoint,
    plan: StaticPlan,
    unit_ids: Collection[int],
    lr: float,
    *,
    device: str | torch.device = "cpu",
    on_tensor: Callable[[int], None] | None = None,
) -> StaticPartial:
    """Measure one share of `plan` (e.g. plan.shares(world_size)[rank]) of the checkpoint
    it was planned from; partial.merge_partials joins the shares into run_static's result."""
    if checkpoint.infos() != plan.infos:
        raise ValueError("audit_units: the plan was made for another checkpoint (its tensors differ)")
    bad = [u for u in unit_ids if not 0 <= u < len(plan.units)]
    if bad:
        raise ValueError(f"audit_units: unit {bad[0]} is not in the plan ({len(plan.units)} units)")
    part = StaticPartial(plan.fingerprint(), lr, plan=plan)
    for result in measure_units(checkpoint, plan, unit_ids, lr, device=device, on_tensor=on_tensor):
        part.units[result.uid] = result
    return part


def audit_tensors(
    checkpoint: str | os.PathLike[str] | Checkpoint,
    names: Iterable[str],
    formats: Sequence[str],
    lr: float,
    *,
    spectral: bool = False,
    device: str | torch.device = "cpu",
) -> StaticPartial:
    """The static audit of one share of a checkpoint's tensors, for a split audit.

    `names` is this caller's part of a partition of the checkpoint's tensor names (by
    shard, say). Small tensors are measured in batches fixed by the whole checkpoint
    (plan.py); each batch is measured by the part holding its first tensor, so some
    tensors of a part may be read by another. merge_partials of every part's result
    equals run_static of the whole checkpoint.
    """
    from ..checkpoint import open_checkpoint

    if isinstance(checkpoint, Checkpoint):
        return _audit_names(checkpoint, set(names), formats, lr, spectral, device)
    with open_checkpoint(checkpoint) as ckpt:
        return _audit_names(ckpt, set(names), formats, lr, spectral, device)


def _audit_names(
    ckpt: Checkpoint, names: set[str], formats: Sequence[str], lr: float, spectral: bool, device: str | torch.device
) -> StaticPartial:
    plan = plan_static(ckpt.infos(), formats, spectral=spectral)
    unknown = names - {i.name for i in plan.infos}
    if unknown:
        raise ValueError(f"audit_tensors: no tensor named {min(unknown)!r} in {shown(ckpt.path)}")
    mine = [uid for uid, u in enumerate(plan.units) if plan.infos[u.members[0]].name in names]
    return audit_units(ckpt, plan, mine, lr, device=device)
