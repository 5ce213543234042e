"""Several weight files read as one checkpoint: sharded indexes and bare directories.

Shared by safetensors and torch shards so the index rules (every shard present,
every mapped tensor where the index says) are checked the same way for both.
Only one shard's handle is open at a time, so memory stays near one tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hallway_audit import limits
from hallway_audit.errors import CheckpointError

from .base import Checkpoint, TensorInfo, shown
from .paths import confined, ensure_inside, read_json

ShardOpener = Callable[[Path], Checkpoint]


def load_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a *.index.json: tensor name -> shard file name."""
    where = shown(index_path)
    data = read_json(index_path, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: malformed index: no 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"{where}: malformed index: tensor {name!r} maps to {shard!r}, not a file name"
            )
    limits.check_tensor_count(len(weight_map), where)  # before any shard is opened
    return dict(weight_map)


class ShardedCheckpoint(Checkpoint):
    """Shards in order, each shard's tensors in its own file order."""

    def __init__(
        self,
        path: Path,
        kind: str,
        shard_paths: list[Path],
        open_shard: ShardOpener,
        weight_map: dict[str, str] | None = None,
        index_path: Path | None = None,
    ) -> None:
        super().__init__(path, kind)
        self._shards: dict[Path, Checkpoint] = {}
        self._current: Checkpoint | None = None
        infos: list[TensorInfo] = []
        folder = index_path.parent if index_path is not None else Path(path)
        wanted = _by_shard(weight_map, folder) if weight_map is not None else None
        for shard_path in shard_paths:  # before anything is opened or tested for existence
            ensure_inside(folder, shard_path, where=shown(index_path or path), what=f"shard {shard_path.name!r}")
        missing = [p.name for p in shard_paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{shown(index_path or path)}: shard {missing[0]!r} is missing{more}"
            )
        try:
            for shard_path in shard_paths:
                shard = open_shard(shard_path)
                shard._release()  # metadata is all we need now; reads reopen lazily
                self._shards[shard_path] = shard
                held = shard.infos()
                if wanted is not None:
                    names = wanted[shard_path]
                    present = {i.name for i in held}
                    absent = sorted(n for n in names if n not in present)
                    if absent:
                        raise CheckpointError(
                            f"{shown(index_path or path)}: index maps {absent[0]!r} to "
                            f"{shard_path.name!r}, but that shard does not hold it"
                            + (f" ({len(absent) - 1} more missing)" if len(absent) > 1 else "")
                        )
                    held = [i for i in held if i.name in names]
                infos.extend(held)
            self._set_infos(infos)
        except BaseException:
            self._release()
            raise
        self._shard_of = {info.name: info.source for info in infos}

    def _read(self, info: TensorInfo) -> torch.Tensor:
        shard = self._shards[self._shard_of[info.name]]
        if self._current is not shard:
            if self._current is not None:
                self._current._release()
            self._current = shard
        return shard.read(info.name)

    def _release(self) -> None:
        for shard in self._shards.values():
            shard._release()
        self._current = None


def _by_shard(weight_map: dict[str, str], folder: Path) -> dict[Path, set[str]]:
    """Tensor names per shard path ("x.safetensors" and "./x.safetensors" are one shard)."""
    out: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        out.setdefault(folder / shard, set()).add(name)
    return out


def open_index(index_path: Path, kind: str, open_shard: ShardOpener, user_path: Path) -> Checkpoint:
    """A checkpoint from a *.index.json, shards in sorted (shard-number) order.

    Shard names are confined to the index's folder before any is opened."""
    weight_map = load_index(index_path)
    where = shown(index_path)
    shard_paths = sorted(
        {confined(index_path.parent, name, where=where, what="shard") for name in weight_map.values()}
    )
    return ShardedCheckpoint(user_path, kind, shard_paths, open_shard, weight_map, index_path)


def find_one(directory: Path, pattern: str, preferred: str) -> Path | None:
    """The file matching pattern in directory; `preferred` wins a tie, several others are an error."""
    if (directory / preferred).is_file():
        found = [directory / preferred]
    else:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{shown(directory)}: several {pattern} files ({names}); name one")
    if not found:
        return None
    ensure_inside(directory, found[0], where=shown(directory), what=repr(found[0].name))
    return found[0]
