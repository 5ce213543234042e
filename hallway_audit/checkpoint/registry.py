"""Format dispatch: each format is one entry (name, detect, open), tried in order.

A registry rather than an if-chain so a new format (or a plugin) is one
register_reader call, and `reader_names()` can list what is supported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hallway_audit.errors import CheckpointError, HallwayError, UnknownNameError
from hallway_audit.limits import is_out_of_memory

from . import hf, onnx_reader, safetensors_reader, torch_reader
from .base import Checkpoint, one_line, shown


@dataclass(frozen=True)
class Reader:
    name: str
    detect: Callable[[Path], bool]  # cheap: looks at names, never at tensor data
    open: Callable[[Path], Checkpoint]


_READERS: dict[str, Reader] = {}

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.onnx")


def register_reader(
    name: str,
    detect: Callable[[Path], bool],
    open: Callable[[Path], Checkpoint],
    *,
    replace: bool = False,
) -> None:
    """Add a format. Readers are tried in registration order; the first whose detect() is true wins."""
    if name in _READERS and not replace:
        raise ValueError(f"a checkpoint reader named {name!r} is already registered")
    _READERS[name] = Reader(name, detect, open)


def reader_names() -> list[str]:
    """Registered format names, in the order they are tried."""
    return list(_READERS)


def open_checkpoint(path: str | os.PathLike[str], reader: str | None = None) -> Checkpoint:
    """Open whatever checkpoint `path` names; `reader` forces a format by name.

    Every failure is a CheckpointError with one line naming the file, except an
    unknown `reader` name, which is a usage error.
    """
    p = Path(os.fspath(path))
    if reader is not None and reader not in _READERS:
        raise UnknownNameError("checkpoint reader", reader, reader_names())
    if not p.exists():
        raise CheckpointError(f"{shown(p)}: no such file or directory")
    try:
        if reader is not None:
            return _not_empty(_READERS[reader].open(p))
        for entry in _READERS.values():
            if entry.detect(p):
                return _not_empty(entry.open(p))
    except HallwayError:
        raise
    except Exception as exc:  # last line of defence: never a library traceback
        if is_out_of_memory(exc):
            raise
        raise CheckpointError(f"{shown(p)}: cannot read checkpoint: {one_line(exc)}") from exc
    raise _not_recognised(p)


def _not_empty(ckpt: Checkpoint) -> Checkpoint:
    """An empty checkpoint is almost always a mistake (a failed save, the wrong file):
    refuse it rather than report a clean audit of nothing."""
    if len(ckpt):
        return ckpt
    ckpt.close()
    what = "initializers (weights kept in Constant nodes are not read)" if ckpt.kind == "onnx" else "tensors"
    raise CheckpointError(f"{shown(ckpt.path)}: holds no {what}")


def _not_recognised(p: Path) -> CheckpointError:
    if p.is_dir():
        several = sorted(
            f.name for pattern in WEIGHT_PATTERNS[1:] for f in p.glob(pattern) if f.is_file()
        )
        if several:
            return CheckpointError(
                f"{shown(p)}: several weight files and no index ({', '.join(several)}); "
                "name the one to audit"
            )
        return CheckpointError(
            f"{shown(p)}: no weights found (looked for {', '.join(WEIGHT_PATTERNS)})"
        )
    return CheckpointError(
        f"{shown(p)}: unknown checkpoint format {p.suffix or '(no extension)'!r} "
        "(expected .safetensors, .safetensors.index.json, .onnx, .pt, .pth, .bin or a directory)"
    )


# Order matters: a Hugging Face directory also contains safetensors files.
register_reader("hf", hf.detect, hf.open_dir)
register_reader(
    "safetensors-sharded", safetensors_reader.detect_sharded, safetensors_reader.open_sharded
)
register_reader("safetensors", safetensors_reader.detect, safetensors_reader.open_file)
register_reader("onnx", onnx_reader.detect, onnx_reader.open_path)
register_reader("torch", torch_reader.detect, torch_reader.open_path)
