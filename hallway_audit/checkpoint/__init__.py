"""Checkpoint reading: every supported format as named tensors, streamed one at a time.

    with open_checkpoint("model/") as ckpt:
        for info, tensor in ckpt:
            ...

Formats: single/sharded/directory safetensors, Hugging Face directories, ONNX
initializers (with external data), torch state dicts (weights_only=True).
"""

from __future__ import annotations

from .base import Checkpoint, TensorInfo
from .layers import group_layers, layer_name
from .registry import Reader, open_checkpoint, reader_names, register_reader

__all__ = [
    "Checkpoint",
    "Reader",
    "TensorInfo",
    "group_layers",
    "layer_name",
    "open_checkpoint",
    "reader_names",
    "register_reader",
]
