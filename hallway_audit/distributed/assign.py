"""Which rank probes which setting: decided from the settings' ids and planned costs alone.

Every rank computes the same assignment from the same inputs (the sweep, the model's
parameter list, the burst options), so nothing is sent to agree on it. Longest
planned work first, each to the rank with the least work so far (ties: the lower
rank; equal costs: the smaller id), balances settings of unequal cost -- a full
fine-tuning burst next to LoRA ones, --per-layer-p -- better than round-robin.
The cost is the estimate's `least` work units (early stopping at its first check),
what a setting usually runs.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign(ids: Sequence[str], costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Positions (into `ids`) per rank, each rank's in sweep order."""
    if len(ids) != len(costs):
        raise ValueError("one cost per setting")
    if len(set(ids)) != len(ids):
        raise ValueError("setting ids must be unique")
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(ids)), key=lambda i: (-costs[i], ids[i])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += max(costs[i], 1)
        shares[rank].append(i)
    return [sorted(s) for s in shares]
