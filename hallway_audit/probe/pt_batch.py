"""How many p_t moves one forward judges: several on CUDA, one on the CPU.

p_t's moves are independent forwards of the same model at nearby weights. On a GPU a
small model's forward leaves most of the device idle, so k moves stacked into one
vmapped forward (LossEvaluator.stacked_losses) cost little more than one; on a CPU
the work is the same either way and vmap's per-example fallbacks (SDPA) only add to
it, so the loop stays. HALLWAY_AUDIT_PT_BATCH=k forces k moves per forward (0 or 1:
the loop) on any device, which is also how the CPU tests check the two paths agree.
Stacking costs k copies of the trained weights (the whole model under full
fine-tuning): the CUDA default checks the free memory first, and a batched forward
that still runs out of memory falls back to the loop.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from ..errors import UsageError

BATCH_ENV = "HALLWAY_AUDIT_PT_BATCH"
CUDA_MOVES = 8  # one early-stopping interval: chunks never need to be cut shorter


def moves_per_forward(weights: Mapping[str, Tensor], trained: Collection[str]) -> int:
    """k from HALLWAY_AUDIT_PT_BATCH when set; else CUDA_MOVES when every weight sits on one CUDA
    device with room for the chunk's copies of the `trained` weights (k realized moves and the
    stack of k + 1: about 2k + 1 copies, with half the free memory left for the forward), 1
    otherwise (a CPU, a device map spreading the model, a full fine-tune too big to copy k times)."""
    raw = os.environ.get(BATCH_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise UsageError(f"{BATCH_ENV}={raw!r} is not a whole number (moves per forward; 0 = one at a time)") from None
        if value < 0:
            raise UsageError(f"{BATCH_ENV}={raw!r} must be 0 or more (moves per forward; 0 = one at a time)")
        return max(value, 1)
    devices = {v.device for v in weights.values()}
    if len(devices) != 1 or (device := next(iter(devices))).type != "cuda":
        return 1
    copy = sum(weights[k].numel() * weights[k].element_size() for k in trained)
    free, _ = torch.cuda.mem_get_info(device)
    return CUDA_MOVES if (2 * CUDA_MOVES + 1) * copy <= free // 2 else 1
