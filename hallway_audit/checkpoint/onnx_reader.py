"""ONNX models: the graph's initializers, including ones kept in external data files.

The model is loaded with load_external_data=False so listing initializers never
reads weights; each tensor's bytes are read only when asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hallway_audit.errors import CheckpointError

from . import dtypes
from .base import Checkpoint, TensorInfo, one_line, shown
from .paths import confined, ensure_inside

SUFFIX = ".onnx"


class OnnxCheckpoint(Checkpoint):
    """The initializers of one .onnx file, in graph order."""

    def __init__(self, path: Path, kind: str = "onnx", user_path: Path | None = None) -> None:
        super().__init__(user_path or path, kind)
        self._file = Path(path)
        where = shown(self._file)
        if not self._file.is_file():
            raise CheckpointError(f"{where}: no such file")
        import onnx
        from onnx.external_data_helper import uses_external_data

        try:
            model = onnx.load(str(self._file), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends
            raise CheckpointError(f"{where}: not a valid ONNX model ({one_line(exc)})") from exc
        self._base_dir = self._file.parent
        self._protos: dict[str, Any] = {}
        infos: list[TensorInfo] = []
        for proto in model.graph.initializer:
            row = dtypes.from_onnx(proto.data_type)
            if row is None:
                raise CheckpointError(
                    f"{where}: initializer {proto.name!r} has unsupported dtype "
                    f"{dtypes.onnx_name(proto.data_type)}"
                )
            shape = tuple(int(d) for d in proto.dims)
            if any(d < 0 for d in shape):
                raise CheckpointError(f"{where}: initializer {proto.name!r} has a negative dimension {list(shape)}")
            nbytes = math.prod(shape) * row.itemsize
            source = self._file
            if uses_external_data(proto):
                source = self._check_external(proto, nbytes)
            else:
                _check_inline(where, proto, math.prod(shape), nbytes, row.torch.is_complex)
            infos.append(TensorInfo(proto.name, row.torch, shape, nbytes, source))
            self._protos[proto.name] = proto
        self._set_infos(infos)

    def _check_external(self, proto: Any, nbytes: int) -> Path:
        """Fail at open, not mid-audit, when an external data file is outside the
        model's folder, missing, short, or holds a length other than the dims say.

        The location is confined to the folder before the file is looked at, so
        a model naming /etc/passwd learns nothing about it (not even its size)."""
        from onnx.external_data_helper import ExternalDataInfo

        where = shown(self._file)
        try:
            ext = ExternalDataInfo(proto)
        except ValueError as exc:
            raise CheckpointError(
                f"{where}: initializer {proto.name!r}: bad external data ({one_line(exc)})"
            ) from exc
        location = str(ext.location or "")
        what = f"external data file of initializer {proto.name!r}"
        data_file = confined(self._base_dir, location, where=where, what=what)
        if not data_file.is_file():
            raise CheckpointError(
                f"{where}: external data file {location!r} for initializer "
                f"{proto.name!r} is missing"
            )
        offset = int(ext.offset or 0)
        length = int(ext.length) if ext.length is not None else nbytes
        if length != nbytes:
            raise CheckpointError(
                f"{where}: initializer {proto.name!r}: dims {list(proto.dims)} need {nbytes} bytes, "
                f"but its external data length is {length}"
            )
        size = data_file.stat().st_size
        if offset + length > size:
            raise CheckpointError(
                f"{shown(data_file)}: truncated: initializer {proto.name!r} needs bytes "
                f"{offset}..{offset + length}, file has {size}"
            )
        return data_file

    def _read(self, info: TensorInfo) -> torch.Tensor:
        from onnx import numpy_helper

        array = numpy_helper.to_array(self._protos[info.name], base_dir=str(self._base_dir))
        return _to_torch(array, info.dtype, info.shape)

    def close(self) -> None:
        super().close()
        self._protos = {}  # inline initializers live in the proto; let them go


def _check_inline(where: str, proto: Any, numel: int, nbytes: int, is_complex: bool) -> None:
    """The bytes (or values) stored in the graph are what the dims promise: a 100-byte
    initializer claiming 10^10 elements is refused here, not when numpy is asked for it."""
    if proto.HasField("raw_data"):
        held, need, unit = len(proto.raw_data), nbytes, "bytes"
    else:
        fields = (proto.float_data, proto.int32_data, proto.int64_data, proto.double_data, proto.uint64_data)
        held, need, unit = max(len(f) for f in fields), numel * (2 if is_complex else 1), "values"
    if held != need:
        raise CheckpointError(
            f"{where}: initializer {proto.name!r}: dims {list(proto.dims)} need {need} {unit}, "
            f"the model holds {held}"
        )


def _to_torch(array: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Reinterpret the bytes, so ml_dtypes types (bfloat16, float8) need no numpy support in torch."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if not flat.flags.writeable:  # frombuffer over bytes; torch wants writable memory
        flat = flat.copy()
    return torch.from_numpy(flat.view(np.uint8)).view(dtype).reshape(shape)


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix == SUFFIX
    return path.is_dir() and len(_candidates(path)) == 1


def _candidates(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.is_file())


def open_path(path: Path) -> Checkpoint:
    if path.is_dir():
        (only,) = _candidates(path)
        ensure_inside(path, only, where=shown(path), what=repr(only.name))
        return OnnxCheckpoint(only, user_path=path)
    return OnnxCheckpoint(path)
