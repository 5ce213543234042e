"""Bounds on what an input may make the audit spend, checked before the spending.

A checkpoint, a config.json or a calibration file is untrusted input: its header
can promise 4e10 elements in a 1.7 KB file or a model that needs terabytes. Each
promise is compared with a limit here, before any allocation, and refused with
one line that names the figure, the limit and how to raise it. Limits that are
policy (how many tensors, how many layers) can be raised with an environment
variable; the memory figure can be overridden for machines where psutil's
"available" undercounts (swap, cgroups that lie).

Also here: recognising an out-of-memory failure whatever raised it, so every
one becomes exit 6.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from .errors import ResourceError, UsageError

if TYPE_CHECKING:
    import torch

# Tensors in one checkpoint. The largest public checkpoints hold ~10^5 tensors
# (MoE models with unfused experts and per-tensor scales). Each tensor costs a
# fixed amount of report and rule work, so the count bounds the audit's time.
MAX_TENSORS_ENV = "HALLWAY_AUDIT_MAX_TENSORS"
MAX_TENSORS_DEFAULT = 200_000

# num_hidden_layers (and its aliases) of a config.json. Published models have at
# most a few hundred; every layer is a Python module transformers constructs (on
# the meta device first, to size the model: ~4 ms per layer).
MAX_LAYERS_ENV = "HALLWAY_AUDIT_MAX_LAYERS"
MAX_LAYERS_DEFAULT = 1024

# config.json and *.index.json: the largest real ones are a few MB (an index of 10^5
# tensors is ~10 MB); anything near this is not a checkpoint's metadata.
MAX_JSON_BYTES_ENV = "HALLWAY_AUDIT_MAX_JSON_BYTES"
MAX_JSON_BYTES_DEFAULT = 256 * 1024 * 1024

# The memory the audit may plan to use, in GB; default: what the OS says is available.
MEMORY_ENV = "HALLWAY_AUDIT_MEMORY_GB"
DEVICE_MEMORY_ENV = "HALLWAY_AUDIT_DEVICE_MEMORY"

# safetensors' own limit on the JSON header (its Rust reader refuses larger ones).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment, or `default`; anything else is a usage error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a whole number") from None
    if value <= 0:
        raise UsageError(f"{name}={raw!r} must be positive")
    return value


def positive_number(name: str, raw: str, unit: str) -> float:
    """The value of environment variable `name` (text `raw`): a finite number above 0,
    else a usage error naming the unit it is read in ("GB", "seconds")."""
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number of {unit}") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name}={raw!r} must be a positive number of {unit}")
    return value


def max_tensors() -> int:
    return env_int(MAX_TENSORS_ENV, MAX_TENSORS_DEFAULT)


def max_layers() -> int:
    return env_int(MAX_LAYERS_ENV, MAX_LAYERS_DEFAULT)


def max_json_bytes() -> int:
    return env_int(MAX_JSON_BYTES_ENV, MAX_JSON_BYTES_DEFAULT)


def check_tensor_count(count: int, where: str) -> None:
    """Refuse a checkpoint holding more tensors than HALLWAY_AUDIT_MAX_TENSORS (exit 6)."""
    limit = max_tensors()
    if count > limit:
        raise ResourceError(
            f"{where}: holds {count} tensors, more than the limit of {limit} "
            f"(set {MAX_TENSORS_ENV} to raise it)"
        )


def count(n: int) -> str:
    """A parameter count as the one-line errors show it: '68.7B', '26.8M', '26792'."""
    if n >= 10**9:
        return f"{n / 1e9:.1f}B"
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    return str(n)


def nbytes_text(nbytes: float) -> str:
    """Bytes as the one-line errors show them: '274.9 GB', '21.0 MB', '512 bytes'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def memory_override() -> tuple[int, str] | None:
    """(bytes, which variable) when the user set how much memory the audit may use:
    HALLWAY_AUDIT_DEVICE_MEMORY (a size, `24GiB`) wins over HALLWAY_AUDIT_MEMORY_GB (GB)."""
    raw = os.environ.get(DEVICE_MEMORY_ENV, "").strip()
    if raw:
        from .memory import parse_size

        return parse_size(raw, DEVICE_MEMORY_ENV), f"{DEVICE_MEMORY_ENV}={raw}"
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if not raw:
        return None
    return int(positive_number(MEMORY_ENV, raw, "GB") * 1e9), f"{MEMORY_ENV}={raw}"


def available_memory(device: str | torch.device = "cpu") -> tuple[int, str]:
    """(bytes the audit may still use on `device`, where that figure comes from).

    memory_override() wins; otherwise the host's available memory
    (psutil) or the CUDA device's free memory.
    """
    override = memory_override()
    if override is not None:
        return override
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    from .memory import host_available  # psutil's figure, or less under a container's memory cgroup

    return host_available()


def _torch_oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


_CPU_OOM_MARKS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError, or torch's CPU allocator failing (a plain RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        if isinstance(exc, _torch_oom_types()):
            return True
        text = str(exc)
        return any(mark in text for mark in _CPU_OOM_MARKS)
    return False


def out_of_memory_message(exc: BaseException) -> str:
    """What exit 6 says: host or device, and what to try."""
    if isinstance(exc, _torch_oom_types()):
        return "out of memory (device): use a smaller batch or --device cpu"
    return "out of memory (host): audit on a machine with more RAM, use a smaller batch, or pass --device cuda"

