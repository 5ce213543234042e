"""A sweep: every setting of the grid, probed from the same checkpoint, batch and seed.

The settings share the unquantized model and the calibration batch: each burst
supplies its own weights to the one module through functional_call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..distributed.ranked import gather_results, sweep_share, watch_progress
from ..memory import sweep_memory
from ..model.data import batch_size
from .burst import BurstOptions, BurstProgress, run_burst, token_count
from .engine import Batch, LossFn
from .estimate import SweepEstimate, estimate_sweep
from .events import BurstEvent, ProgressEvent
from .result import SettingResult
from .settings import Setting
from .shares import SharesVerdict
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
    notes: list[str] = field(default_factory=list)  # for the report's notes: slow paths taken and why
    estimate: SweepEstimate | None = None  # the planned passes, to compare with each setting's cost
    placement: dict[str, object] | None = None  # --device-map: where the model's modules were put (model/placement.py)


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
    estimate = estimate_sweep(
        settings, params, options, train_examples=batch_size(train),
        val_examples=batch_size(val) if val is not None else 0,
        weight_bytes=sum(t.numel() * t.element_size() for t in base.values()),
        memory=sweep_memory(module, settings, options, train, val),
    )
    # Under torchrun this rank probes its share of the settings (all of them in a single
    # process) and rank 0 gathers every result; its display shows its own share.
    mine = sweep_share(settings, [s.least.units for s in estimate.settings])
    if progress is not None:
        shown = estimate if len(mine) == len(settings) else replace(estimate, settings=tuple(estimate.settings[i] for i in mine))
        progress(shown)  # the plan, before any pass
    watched = watch_progress(progress)
    # Each setting decides for itself whether the loss splits by example (SharesVerdict):
    # its numbers are then the same whichever settings ran before it, on whichever rank.
    results = [
        run_burst(settings[i], module, loss_fn, loss_name, params, base, train, val, options,
                  _placed(watched, k, len(mine)), SharesVerdict())
        for k, i in enumerate(mine)
    ]
    results = gather_results(settings, results)
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
        notes=slow_path_notes(results),
        estimate=estimate,
    )


def _placed(progress: BurstProgress | None, index: int, count: int) -> BurstProgress | None:
    """The sweep's callback, with each event told its setting's place in the sweep."""
    if progress is None:
        return None
    report = progress

    def placed(event: ProgressEvent) -> None:
        report(replace(event, index=index, settings=count) if isinstance(event, BurstEvent) else event)

    return placed


def slow_path_notes(results: list[SettingResult]) -> list[str]:
    """One note per reason a LoRA setting's p_t took direct gradients where shares were
    expected (full and sparse settings always do; that is no news)."""
    by_reason: dict[str, list[str]] = {}
    for r in results:
        if r.setting.subspace.kind != "lora":
            continue
        for state in r.pt:
            if state.g_b == "direct" and state.g_b_reason and r.id not in by_reason.get(state.g_b_reason, []):
                by_reason.setdefault(state.g_b_reason, []).append(r.id)
    return [f"p_t g_b of {', '.join(ids)}: {reason}" for reason, ids in by_reason.items()]


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when present, else cpu; otherwise any torch device string. Under
    torchrun, cuda (and auto with CUDA) is cuda:LOCAL_RANK: one GPU per process."""
    from ..distributed.ranked import active
    from ..model.loaded import parse_device

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    session = active()
    if spec == "cuda" and session is not None:
        dev = parse_device(f"cuda:{session.local_rank}")
        torch.cuda.set_device(dev)  # what runs without an explicit device index runs on this rank's GPU too
        return dev
    return parse_device(spec)
