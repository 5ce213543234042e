"""Pausing the cyclic garbage collector while a step builds a million acyclic objects.

Rule outcomes and report entries are plain records that never form cycles, so
the collector can find nothing among them; but every 700 new objects it runs,
and as they pile up it re-walks every object the process holds (the static
result of 10^5 layers, the subjects): seconds on a large checkpoint. Reference
counting still frees everything as usual; the collector resumes afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block (restored as it was, even on error)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
