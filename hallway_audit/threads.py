"""CPU threads for small models: one is faster, and the same on every machine.

A probe burst on a model of a few million parameters is thousands of tiny matrix
products; torch's default of one OpenMP thread per core makes each wait on the
others, and on a busy machine (a CI runner, a laptop compiling) the quick start took
5-8 minutes with two threads against 30-40 s with one. Large models keep torch's
default. A user's OMP_NUM_THREADS or HALLWAY_AUDIT_THREADS is always respected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_MODEL_PARAMS = 20_000_000  # below this a CPU audit runs on one thread by default


@contextmanager
def cpu_threads(params: int, device: torch.device) -> Iterator[int]:
    """Run the body with the thread count chosen for a model of `params` on `device`."""
    before = torch.get_num_threads()
    wanted = before
    given = os.environ.get("HALLWAY_AUDIT_THREADS")
    if given is not None and given.strip().isdigit() and int(given) > 0:
        wanted = int(given)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and params < SMALL_MODEL_PARAMS:
        wanted = 1
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)
