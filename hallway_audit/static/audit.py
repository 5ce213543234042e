"""The static audit: every tensor of a checkpoint against the planned number formats.

Streams the checkpoint one tensor at a time, so peak memory is about the largest
tensor (times the few float32 temporaries one format needs), whatever the
checkpoint's size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..checkpoint import Checkpoint, layer_name
from ..lattice import get_format
from .measure import CHUNK, SMALL_NUMEL, measure_many, measure_tensor
from .result import LayerResult, StaticResult, TensorEntry
from .spectral import spectral_figures
from .tally import FormatTally, Tally

# progress(bytes_done, bytes_total, tensor_name)
Progress = Callable[[int, int, str], None]

_AUDITABLE = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _auditable(dtype: torch.dtype) -> bool:
    return dtype in _AUDITABLE or "float8" in str(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_static(
    checkpoint: Checkpoint,
    formats: Sequence[str],
    lr: float,
    *,
    spectral: bool = False,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> StaticResult:
    """Every float tensor of `checkpoint` against `formats`, per layer and for the model.

    Small tensors (up to SMALL_NUMEL elements) are gathered and measured together
    when every format is plain, so a checkpoint of 10^5 tiny tensors costs a few
    vectorised passes instead of 10^5 x 30 small torch calls; the figures are the
    same as measuring each alone.
    """
    fmts = {name: get_format(name) for name in formats}
    names = [f.name for f in fmts.values()]
    fmts = {f.name: f for f in fmts.values()}
    batchable = not any(f.scaled for f in fmts.values())
    infos = checkpoint.infos()
    total = sum(i.nbytes for i in infos)
    layers: dict[str, LayerResult] = {}
    skipped: list[tuple[str, str]] = []
    model = Tally(formats={name: FormatTally() for name in names})
    pending: list[tuple[torch.Tensor, LayerResult]] = []
    pending_numel = 0

    def flush() -> None:
        nonlocal pending_numel, model
        tallies = measure_many([w for w, _ in pending], fmts, lr)
        for (_, layer), tally in zip(pending, tallies, strict=True):
            layer.tally += tally
            model += tally
        pending.clear()
        pending_numel = 0

    done = 0
    start = time.perf_counter()
    for info in infos:
        if progress is not None:
            progress(done, total, info.name)
        if not _auditable(info.dtype):
            skipped.append((info.name, f"{dtype_name(info.dtype)} tensor: not a float weight"))
            done += info.nbytes
            continue
        name = layer_name(info.name)
        layer = layers.get(name)
        if layer is None:
            layer = layers[name] = LayerResult(name)
        layer.tensors.append(TensorEntry(info.name, dtype_name(info.dtype), tuple(info.shape)))
        w = checkpoint.read(info.name).to(device)
        if spectral and w.dim() >= 2 and w.numel() > layer._spectral_numel:
            layer.spectral = spectral_figures(w)
            layer._spectral_numel = w.numel()
        if batchable and w.numel() <= SMALL_NUMEL:
            pending.append((w, layer))
            pending_numel += w.numel()
            if pending_numel >= CHUNK:
                flush()
        else:
            tally = measure_tensor(w, fmts, lr)
            layer.tally += tally
            model += tally
        del w
        done += info.nbytes
    if pending:
        flush()
    if progress is not None:
        progress(total, total, "")
    if spectral:
        for layer in layers.values():
            if layer.spectral is None:
                layer.spectral = {"stable_rank": None, "effective_rank": None}
    return StaticResult(
        formats=names,
        lr=lr,
        layers=list(layers.values()),
        model=model,
        skipped=skipped,
        spectral=spectral,
        bytes_read=total,
        seconds=time.perf_counter() - start,
    )
