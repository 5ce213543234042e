"""What every reader returns: tensor metadata and the Checkpoint interface.

Readers differ in how they find and decode bytes; everything downstream (static
audit, layer grouping) only sees TensorInfo and one-tensor-at-a-time reads, so a
checkpoint larger than RAM can be audited.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hallway_audit import limits
from hallway_audit.errors import CheckpointError, HallwayError


def shown(path: Path | str) -> str:
    """A path as error messages show it: as the user spelled it, directories with '/'."""
    text = str(path)
    if Path(path).is_dir() and not text.endswith("/"):
        text += "/"
    return text


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor's metadata, known without reading its data."""

    name: str
    dtype: torch.dtype  # as stored
    shape: tuple[int, ...]
    nbytes: int  # bytes as stored
    source: Path  # the file holding the data

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint(abc.ABC):
    """A set of named tensors read lazily from disk, one tensor at a time.

    Subclasses list their tensors once (metadata only) via _set_infos and
    implement _read; the base class supplies lookup, error wrapping, iteration
    and the context-manager protocol.
    """

    def __init__(self, path: Path, kind: str, config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.kind = kind
        self.config = config
        self._infos: list[TensorInfo] = []
        self._by_name: dict[str, TensorInfo] = {}
        self._closed = False

    # -- subclass hooks -------------------------------------------------------

    def _set_infos(self, infos: Iterable[TensorInfo]) -> None:
        """Record the tensors in their stable order; a name twice is a corrupt file,
        more than HALLWAY_AUDIT_MAX_TENSORS a refusal (exit 6)."""
        self._infos = list(infos)
        limits.check_tensor_count(len(self._infos), shown(self.path))
        self._by_name = {}
        for info in self._infos:
            if info.name in self._by_name:
                first = self._by_name[info.name].source
                raise CheckpointError(
                    f"{shown(self.path)}: tensor {info.name!r} appears twice "
                    f"(in {first.name} and {info.source.name})"
                )
            self._by_name[info.name] = info

    @abc.abstractmethod
    def _read(self, info: TensorInfo) -> torch.Tensor:
        """Read one tensor's data (CPU, stored dtype)."""

    def _release(self) -> None:  # noqa: B027  an optional hook: a reader may hold nothing
        """Drop open handles/mmaps; a later _read may reacquire them."""

    # -- public API -----------------------------------------------------------

    def infos(self) -> list[TensorInfo]:
        """Every tensor's metadata, in stable file order; reads no tensor data."""
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, on CPU, in its stored dtype."""
        if self._closed:
            raise ValueError(f"{shown(self.path)}: checkpoint is closed")
        info = self._by_name.get(name)
        if info is None:
            raise CheckpointError(f"{shown(self.path)}: no tensor named {name!r}")
        try:
            tensor = self._read(info)
        except HallwayError:
            raise
        except Exception as exc:  # a library failing mid-read: say which file and tensor
            if limits.is_out_of_memory(exc):
                raise
            raise CheckpointError(
                f"{shown(info.source)}: cannot read tensor {name!r}: {one_line(exc)}"
            ) from exc
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise CheckpointError(
                f"{shown(info.source)}: tensor {name!r} read as {tensor.dtype} "
                f"{list(tensor.shape)}, but its header says {info.dtype} {list(info.shape)} "
                "(did the file change while open?)"
            )
        return tensor

    def __iter__(self) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Lazily yield (info, tensor) in file order; only one tensor is read per step."""
        for info in self.infos():
            yield info, self.read(info.name)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def total_params(self) -> int:
        return sum(info.numel for info in self._infos)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._infos)

    def close(self) -> None:
        """Release file handles and memory maps. Idempotent."""
        self._release()
        self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind!r} path={str(self.path)!r} tensors={len(self)}>"


def one_line(exc: BaseException) -> str:
    """A library's message squeezed onto one line (some span paragraphs)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."

