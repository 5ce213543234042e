"""A sweep: every setting of the grid, probed from the same checkpoint, batch and seed.

The settings share the unquantized model and the calibration batch: each burst
supplies its own weights to the one module through functional_call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..model.data import batch_size
from .burst import BurstOptions, BurstProgress, run_burst, token_count
from .engine import Batch, LossFn
from .result import SettingResult
from .settings import Setting
from .targets import param_dict, parameter_universe


@dataclass
class DynamicResult:
    model_source: str
    loss_name: str
    calib: str
    val: str  # a path, or how the held-out batch was made
    train_examples: int
    val_examples: int
    tokens: int
    options: BurstOptions
    device: str
    settings: list[SettingResult]
    seconds: float


def run_sweep(
    module: nn.Module,
    *,
    settings: list[Setting],
    loss_fn: LossFn,
    loss_name: str,
    train: Batch,
    val: Batch | None,
    options: BurstOptions,
    model_source: str,
    calib: str,
    val_source: str,
    progress: BurstProgress | None = None,
) -> DynamicResult:
    start = time.perf_counter()
    params = parameter_universe(module)
    base = param_dict(module)
    device = str(next(iter(base.values())).device)
    results = [
        run_burst(s, module, loss_fn, loss_name, params, base, train, val, options, progress) for s in settings
    ]
    return DynamicResult(
        model_source=model_source,
        loss_name=loss_name,
        calib=calib,
        val=val_source,
        train_examples=batch_size(train),
        val_examples=batch_size(val) if val is not None else 0,
        tokens=token_count(train),
        options=options,
        device=device,
        settings=results,
        seconds=time.perf_counter() - start,
    )


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when present, else cpu; otherwise any torch device string."""
    from ..model.loaded import parse_device

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(spec)
