"""The static audit: every tensor of a checkpoint against the planned number formats.

Streams the checkpoint one tensor at a time, so peak memory is about the largest
tensor (times the few float32 temporaries one format needs), whatever the
checkpoint's size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .. import limits
from ..checkpoint import Checkpoint, TensorInfo, layer_name
from ..checkpoint.base import shown
from ..errors import ResourceError
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
        if info.numel >= _CHECK_FROM:
            _check_fits(info, scaled=not batchable, spectral=spectral, device=device)
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
