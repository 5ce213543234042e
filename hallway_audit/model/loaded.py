"""What building a model yields, and the one way every builder finishes it.

Both builders (Hugging Face directories, --model factories) end in `finish`, so
every LoadedModel is float32, on its device and in evaluation mode (module.eval()), whatever the
checkpoint's stored dtype or the factory's defaults.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hallway_audit.errors import ResourceError, UsageError

from ..checkpoint.base import one_line
from ..limits import is_out_of_memory

if TYPE_CHECKING:
    from .placement import Placement

KINDS = ("hf-causal-lm", "hf", "factory")
# torch.OutOfMemoryError is torch >= 2.5; the CUDA one is older. Either means "exit 6"
# (so does torch's CPU allocator failing, a plain RuntimeError: see limits.is_out_of_memory).
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (
    MemoryError,
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
)


@dataclass
class LoadedModel:
    """A runnable model for the dynamic audit.

    `module` is float32 (the probe measures the formats it plans against an
    exact reference), on the requested device, and in evaluation mode (module.eval()): the p_t
    finite differences compare the loss at two weight vectors, and dropout
    would add a fresh random mask to each side (noise larger than the moves
    measured), while train-mode BatchNorm would rewrite its running statistics
    on every probe forward. Gradients still flow in evaluation mode (module.eval()).
    """

    module: torch.nn.Module
    kind: str  # one of KINDS
    source: str  # for the report: "transformers LlamaForCausalLM from dir/config.json"
    tokenizer: object | None  # a transformers tokenizer when the HF directory has one
    input_names: tuple[str, ...]  # named parameters of module.forward, to filter batch keys
    placement: Placement | None = None  # --device-map: where accelerate put each module (model/placement.py)


def forward_names(module: torch.nn.Module) -> tuple[str, ...]:
    """The parameters forward() takes by name (no *args/**kwargs): the batch keys it can receive."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # builtins / scripted modules: no signature to read
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in named)


RUNNABLE_DEVICES = ("cpu", "cuda")


def parse_device(device: str | torch.device) -> torch.device:
    """A torch.device, or a usage error naming what is wrong with the --device value."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"device {str(device)!r} is not a torch device: {one_line(exc)}") from exc
    if dev.type not in RUNNABLE_DEVICES:
        # meta holds no data, and other backends lack float64 or ops the audit uses
        raise UsageError(
            f"device {str(device)!r} is not a device the audit can run on: use "
            + " or ".join(RUNNABLE_DEVICES)
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {str(device)!r} requested, but torch {torch.__version__} sees no CUDA device"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"device {str(device)!r} requested, but torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def finish(
    module: torch.nn.Module,
    *,
    kind: str,
    source: str,
    device: str | torch.device,
    tokenizer: object | None = None,
    placement: Placement | None = None,
) -> LoadedModel:
    """float32 + device + evaluation mode: the state every consumer of a LoadedModel relies on.
    A placed module (--device-map) is float32 on its devices already and is not moved."""
    dev = parse_device(device)
    if placement is None:
        try:
            module = module.float().to(dev)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise ResourceError(f"out of memory moving {source} to {dev}: {one_line(exc)}") from exc
    module.eval()
    return LoadedModel(
        module=module,
        kind=kind,
        source=source,
        tokenizer=tokenizer,
        input_names=forward_names(module),
        placement=placement,
    )
