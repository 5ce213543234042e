"""Single .safetensors files: header validated here, data read through safe_open.

The header is checked by hand first because safetensors' own errors ("invalid
offset", "incomplete metadata") don't say what is wrong in terms a user can act
on: a truncated download, a file that isn't safetensors at all, a bad dtype.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hallway_audit import limits
from hallway_audit.errors import CheckpointError

from . import dtypes
from .base import Checkpoint, TensorInfo, one_line, shown

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = limits.MAX_HEADER_BYTES  # safetensors' own limit on the JSON header
# safe_open hands out tensors backed by one mmap of the whole file; the pages a
# caller touched stay resident while the handle lives. Reopening the handle after
# this many bytes keeps resident memory near one tensor instead of the whole file.
_HANDLE_BYTE_BUDGET = 256 * 1024 * 1024


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: dtypes.DType
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data region
    end: int


def read_header(path: Path) -> list[HeaderEntry]:
    """Parse and validate a safetensors header; entries in data-offset order.

    Reads only the 8-byte length and the JSON header, never tensor data.
    """
    where = shown(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{where}: not a safetensors file: only {size} bytes, "
                    "too short for the 8-byte header length"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{where}: not a safetensors file: header length {header_len} "
                    f"is larger than the file ({size} bytes)"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{where}: not a safetensors file: header length {header_len} "
                    f"exceeds the {MAX_HEADER_BYTES} byte limit"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read: {one_line(exc)}") from exc
    # Every entry has one "data_offsets" key: count them before json.loads builds
    # a Python object per entry (a 99 MB header holds over a million).
    limits.check_tensor_count(raw.count(b'"data_offsets"'), where)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{where}: not a safetensors file: header is not valid JSON ({one_line(exc)})"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file: header is not a JSON object")

    entries = [
        _entry(where, name, spec) for name, spec in header.items() if name != "__metadata__"
    ]
    metadata = header.get("__metadata__")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: header '__metadata__' is not a JSON object")

    data_size = size - 8 - header_len
    promised = max((e.end for e in entries), default=0)
    if promised > data_size:
        raise CheckpointError(
            f"{where}: truncated: header promises {promised} bytes of tensor data, "
            f"file has {data_size}"
        )
    entries.sort(key=lambda e: (e.begin, e.end))
    for prev, e in itertools.pairwise(entries):
        if e.begin < prev.end:
            raise CheckpointError(
                f"{where}: tensor {e.name!r} data_offsets [{e.begin}, {e.end}] overlap "
                f"tensor {prev.name!r} [{prev.begin}, {prev.end}]"
            )
    covered = 0
    for e in entries:
        if e.begin != covered:
            raise CheckpointError(
                f"{where}: tensor {e.name!r} data_offsets [{e.begin}, {e.end}] leave a gap "
                f"(the previous tensor ends at {covered})"
            )
        covered = e.end
    if covered != data_size:
        raise CheckpointError(
            f"{where}: {data_size - covered} bytes of unexplained data after the last "
            "tensor (header and file size disagree)"
        )
    return entries


def _entry(where: str, name: str, spec: Any) -> HeaderEntry:
    """Validate one header entry: known dtype, sane shape, offsets that match the size."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError(
            f"{where}: tensor {name!r}: header entry needs 'dtype', 'shape' and 'data_offsets'"
        )
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    row = dtypes.from_safetensors(code) if isinstance(code, str) else None
    if row is None:
        raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    needed = math.prod(shape) * row.itemsize
    if end - begin != needed:
        raise CheckpointError(
            f"{where}: tensor {name!r}: {code} {shape} needs {needed} bytes, "
            f"but data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return HeaderEntry(name, row, tuple(shape), begin, end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsCheckpoint(Checkpoint):
    """One .safetensors file, memory-mapped lazily by safe_open."""

    def __init__(self, path: Path, kind: str = "safetensors") -> None:
        super().__init__(path, kind)
        if not self.path.is_file():
            raise CheckpointError(f"{shown(self.path)}: no such file")
        self._set_infos(
            TensorInfo(e.name, e.dtype.torch, e.shape, e.end - e.begin, self.path)
            for e in read_header(self.path)
        )
        self._handle: Any = None
        self._bytes_through_handle = 0

    def _read(self, info: TensorInfo) -> torch.Tensor:
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt")
            self._handle.__enter__()
            self._bytes_through_handle = 0
        tensor = self._handle.get_tensor(info.name)
        self._bytes_through_handle += info.nbytes
        if self._bytes_through_handle >= _HANDLE_BYTE_BUDGET:
            self._release()  # tensors already handed out keep their own mapping alive
        return tensor

    def _release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)


def detect(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SUFFIX)


def open_file(path: Path) -> Checkpoint:
    return SafetensorsCheckpoint(path)


# -- several files: "safetensors-sharded" -------------------------------------

INDEX_SUFFIX = ".safetensors.index.json"


def detect_sharded(path: Path) -> bool:
    """An index file, or a directory holding an index or any .safetensors files."""
    if path.is_file():
        return path.name.endswith(INDEX_SUFFIX)
    return path.is_dir() and any(
        p.name.endswith((SUFFIX, INDEX_SUFFIX)) for p in path.iterdir() if p.is_file()
    )


def open_sharded(path: Path, kind: str = "safetensors-sharded") -> Checkpoint:
    """Through the index when there is one; otherwise every .safetensors file in the directory."""
    from .sharded import ShardedCheckpoint, find_one, open_index

    if path.is_file():
        return open_index(path, kind, open_file, path)
    index = find_one(path, f"*{INDEX_SUFFIX}", f"model{INDEX_SUFFIX}")
    if index is not None:
        return open_index(index, kind, open_file, path)
    files = sorted(p for p in path.glob(f"*{SUFFIX}") if p.is_file())
    if not files:
        raise CheckpointError(f"{shown(path)}: no .safetensors files found")
    return ShardedCheckpoint(path, kind, files, open_file)
