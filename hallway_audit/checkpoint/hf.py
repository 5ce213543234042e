"""Hugging Face model directories: config.json beside the weights.

Only the weights are read here; config.json is parsed and kept so later stages
(building the architecture, naming layers) need not find it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hallway_audit.errors import CheckpointError

from . import safetensors_reader, torch_reader
from .base import Checkpoint, TensorInfo, shown
from .paths import ensure_inside, read_json
from .sharded import ShardedCheckpoint, open_index

CONFIG = "config.json"
# The file names transformers itself writes, most preferred first. Other *.bin
# files in such a directory (training_args.bin, optimizer.pt) are not weights.
LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class HFCheckpoint(Checkpoint):
    """The weights of a Hugging Face directory, read by the reader for its layout."""

    def __init__(self, path: Path, inner: Checkpoint, config: dict[str, Any]) -> None:
        super().__init__(path, "hf", config)
        self.inner = inner
        self.weights_layout = inner.kind
        self._set_infos(inner.infos())

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self.inner.read(info.name)

    def _release(self) -> None:
        self.inner._release()

    def close(self) -> None:
        super().close()
        self.inner.close()


def read_config(path: Path) -> dict[str, Any]:
    """config.json, read only if it is a regular file inside the folder of at most
    MAX_JSON_BYTES (a link to /dev/zero or a 10 GB file is refused, not read)."""
    where = shown(path / CONFIG)
    ensure_inside(path, path / CONFIG, where=shown(path), what=repr(CONFIG))
    config = read_json(path / CONFIG, "config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: malformed config: not a JSON object")
    return config


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def open_dir(path: Path) -> Checkpoint:
    config = read_config(path)
    inner = _open_weights(path)
    try:
        return HFCheckpoint(path, inner, config)
    except BaseException:
        inner.close()
        raise


def _open_weights(path: Path) -> Checkpoint:
    for name in LAYOUTS:
        if (path / name).is_file():
            ensure_inside(path, path / name, where=shown(path), what=repr(name))
            break
    if (path / "model.safetensors.index.json").is_file():
        return open_index(
            path / "model.safetensors.index.json",
            "safetensors-sharded",
            safetensors_reader.open_file,
            path,
        )
    if (path / "model.safetensors").is_file():
        return safetensors_reader.SafetensorsCheckpoint(path / "model.safetensors")
    if (path / "pytorch_model.bin.index.json").is_file():
        return open_index(
            path / "pytorch_model.bin.index.json", "torch", torch_reader.open_file, path
        )
    if (path / "pytorch_model.bin").is_file():
        return torch_reader.TorchCheckpoint(path / "pytorch_model.bin")
    # Variants (model.fp16.safetensors) or hand-written shards without an index.
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return ShardedCheckpoint(path, "safetensors-sharded", files, safetensors_reader.open_file)
    looked = ", ".join(LAYOUTS)
    raise CheckpointError(
        f"{shown(path)}: config.json found but no weights (looked for {looked}, *.safetensors)"
    )
