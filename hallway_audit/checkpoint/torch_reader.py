"""PyTorch state dicts (.pt/.pth/.bin), loaded with weights_only=True only.

weights_only refuses any pickle that would run code, which is the point: an
audit tool must be safe to point at an untrusted download. mmap=True keeps the
tensors on disk until touched, so listing them reads no data.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hallway_audit.errors import CheckpointError, HallwayError
from hallway_audit.limits import is_out_of_memory

from .base import Checkpoint, TensorInfo, one_line, shown
from .paths import ensure_inside

SUFFIXES = (".pt", ".pth", ".bin")
INDEX_SUFFIXES = (".bin.index.json", ".pt.index.json", ".pth.index.json")
# Keys under which training scripts commonly nest the weights.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint file, memory-mapped when the format allows."""
    where = shown(path)
    # mmap needs the zip format (torch >= 1.6 default); legacy pickles load eagerly.
    use_mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        needed = re.search(r"GLOBAL ([\w.]+)", text)
        if needed or "allowed global" in text:
            what = f" ({needed.group(1)})" if needed else ""
            raise CheckpointError(
                f"{where}: refuses to unpickle code: the file needs a Python object{what} "
                "that weights_only loading does not allow; re-save it as a plain state "
                "dict or as safetensors"
            ) from exc
        # torch prefixes a paragraph of advice; the unpickler's own reason is what helps.
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        detail = " ".join(reason.group(1).split()) if reason else one_line(exc)
        raise CheckpointError(f"{where}: not a readable torch checkpoint ({detail})") from exc
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read: {one_line(exc)}") from exc
    except Exception as exc:  # torch raises RuntimeError/ValueError/EOFError for corrupt files
        if is_out_of_memory(exc):
            raise
        raise CheckpointError(f"{where}: not a readable torch checkpoint ({one_line(exc)})") from exc
    return _tensors_of(obj, where)


def _tensors_of(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """A dict of tensors, or one nested under a usual key; non-tensors are skipped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)"
        )
    tensors = _plain_tensors(obj)
    if tensors:
        return tensors
    for key in NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            tensors = _plain_tensors(inner)
            if tensors:
                return tensors
    keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
    raise CheckpointError(f"{where}: holds no tensors (top-level keys: {keys})")


def _plain_tensors(mapping: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    # Sparse/quantized layouts are skipped: the audit works on dense stored values.
    return {
        k: v
        for k, v in mapping.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided
    }


def storage_problem(name: str, tensor: torch.Tensor) -> str | None:
    """Why `tensor` (as torch.load returned it) must not be used, or None.

    A pickle records each tensor's shape and strides beside its storage, and the two
    need not agree: torch.zeros(1).expand(200000, 200000) saves as 1.7 KB and would
    be 4e10 elements (160 GB as float32) once anything copies it. A tensor is refused
    when it has more elements than its storage holds past its offset (stride-0 or
    overlapping views): whatever then reads it is bounded by the storage, and the
    storage by the file. Tensors on a device other than the CPU (meta) hold no data.
    """
    if tensor.device.type != "cpu":
        return f"tensor {name!r} is on device {tensor.device.type!r}, which holds no readable data"
    if tensor.layout != torch.strided:
        return None  # skipped by the readers, never materialized
    itemsize = tensor.element_size()
    held = tensor.untyped_storage().nbytes() // itemsize - tensor.storage_offset() if itemsize else 0
    numel = tensor.numel()
    if numel > max(held, 0):
        return (
            f"tensor {name!r} is a view of {numel} elements {list(tensor.shape)} (strides "
            f"{list(tensor.stride())}) over a storage of {max(held, 0)}: an expand()ed or overlapping "
            "tensor; re-save it with .contiguous() or .clone()"
        )
    return None


def check_storage(
    tensors: Mapping[Any, Any], where: str, error: type[HallwayError] = CheckpointError
) -> None:
    """Raise `error` for the first tensor of `tensors` that storage_problem refuses.

    Shared by the checkpoint reader (exit 3) and calibration loading (DataError,
    exit 8): call it right after torch.load, before anything copies a tensor."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            problem = storage_problem(str(name), value)
            if problem is not None:
                raise error(f"{where}: {problem}")


class TorchCheckpoint(Checkpoint):
    """One torch checkpoint file; state dict order is kept (it is module order)."""

    def __init__(self, path: Path, kind: str = "torch", user_path: Path | None = None) -> None:
        super().__init__(user_path or path, kind)
        self._file = Path(path)
        if not self._file.is_file():
            raise CheckpointError(f"{shown(self._file)}: no such file")
        tensors = load_state_dict(self._file)
        check_storage(tensors, shown(self._file))
        self._set_infos(
            TensorInfo(
                name,
                t.dtype,
                tuple(t.shape),
                t.numel() * t.element_size(),
                self._file,
            )
            for name, t in tensors.items()
        )
        self._tensors: dict[str, torch.Tensor] | None = tensors

    def _read(self, info: TensorInfo) -> torch.Tensor:
        if self._tensors is None:
            tensors = load_state_dict(self._file)
            check_storage(tensors, shown(self._file))  # the file may have changed since it was opened
            self._tensors = tensors
        # detach: hand back a plain Tensor even if a Parameter was saved.
        return self._tensors[info.name].detach()

    def _release(self) -> None:
        self._tensors = None  # drops the mmap once callers drop their tensors


def _candidates(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in SUFFIXES)


def detect(path: Path) -> bool:
    """A .pt/.pth/.bin file or its index, or a directory with one such file or an index."""
    if path.is_file():
        return path.suffix in SUFFIXES or path.name.endswith(INDEX_SUFFIXES)
    if not path.is_dir():
        return False
    has_index = any(p.name.endswith(INDEX_SUFFIXES) for p in path.iterdir())
    return has_index or len(_candidates(path)) == 1


def open_file(path: Path) -> Checkpoint:
    return TorchCheckpoint(path)


def open_path(path: Path, kind: str = "torch") -> Checkpoint:
    """A file, an index (sharded), or a directory holding one of those."""
    from .sharded import open_index

    if path.is_dir():
        indexes = sorted(p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIXES))
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CheckpointError(f"{shown(path)}: several index files ({names}); name one")
        if indexes:
            ensure_inside(path, indexes[0], where=shown(path), what=repr(indexes[0].name))
            return open_index(indexes[0], kind, open_file, path)
        (only,) = _candidates(path)
        ensure_inside(path, only, where=shown(path), what=repr(only.name))
        return TorchCheckpoint(only, kind, user_path=path)
    if path.name.endswith(INDEX_SUFFIXES):
        return open_index(path, kind, open_file, path)
    return TorchCheckpoint(path, kind)
