"""The static pass under torchrun: each rank measures a share of the checkpoint's tensors,
rank 0 merges the shares into exactly what one process measures.

The plan (hallway_audit.static.plan) is made from the checkpoint's metadata, so every
rank makes the same one; `plan.shares(world_size)` cuts it into runs of consecutive
units of about equal bytes, each rank measures its run (audit_units), hands it in at
the exchange as plain data with its sweep results, and rank 0 adds the units in plan
order (merge_partials), float sums included in the same order: the merged result is
run_static's, bit for bit, whatever the number of ranks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..checkpoint import Checkpoint
from ..errors import ExitCode
from ..static.audit import Progress, audit_units
from ..static.partial import StaticPartial, merge_partials
from ..static.plan import plan_static
from ..static.result import StaticResult
from . import codec
from .ranked import active, gather_results
from .session import RankFailure

KEY = "static"


def static_share(
    checkpoint: Checkpoint,
    formats: Sequence[str],
    lr: float,
    *,
    spectral: bool,
    device: str | torch.device,
    progress: Progress | None = None,
) -> StaticPartial:
    """Measure this rank's share of the static pass; it travels to rank 0 at the exchange."""
    session = active()
    assert session is not None, "static_share runs under torchrun only"
    start = time.perf_counter()
    plan = plan_static(checkpoint.infos(), formats, spectral=spectral)
    mine = plan.shares(session.world_size)[session.rank]
    total = sum(plan.unit_bytes(u) for u in mine)
    done = 0

    def on_tensor(i: int) -> None:
        nonlocal done
        session.check()  # progress for the others, and stop early once another rank failed
        if progress is not None:
            progress(done, total, plan.infos[i].name)
        done += plan.infos[i].nbytes

    part = audit_units(checkpoint, plan, mine, lr, device=device, on_tensor=on_tensor)
    if progress is not None:
        progress(total, total, "")
    session.handed[KEY] = codec.encode(part.to_plain())
    session.static_seconds = time.perf_counter() - start
    return part


def merged_static(own: StaticPartial) -> StaticResult:
    """Rank 0: every rank's share merged in plan order (meeting the others first when no
    sweep did). A share planned from other files is a checkpoint error naming the rank."""
    session = active()
    assert session is not None and session.rank == 0 and own.plan is not None
    if not session.exchanged:
        gather_results([], [])  # a static-only audit: the others hand in their shares now
    assert session.received is not None
    partials = [own]
    for rank, part in enumerate(session.received):
        if rank == 0:
            continue
        try:
            partials.append(StaticPartial.from_plain(codec.decode(part["extra"][KEY])))
        except (KeyError, TypeError, ValueError) as exc:
            raise RankFailure(int(ExitCode.DISTRIBUTED), f"rank {rank}: its static share could not be read: {exc}") from exc
    try:
        return merge_partials(partials, own.plan, seconds=session.static_seconds)
    except ValueError as exc:
        raise RankFailure(int(ExitCode.CHECKPOINT),
                          f"rank 0: the ranks' static shares do not add up (does every node see the same checkpoint "
                          f"files?): {exc}") from exc
