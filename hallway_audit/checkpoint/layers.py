"""Tensor names -> module (layer) paths, so metrics can be reported per layer."""

from __future__ import annotations

from collections.abc import Iterable

from .base import TensorInfo

_PARAM_SUFFIXES = ("weight", "bias")


def layer_name(tensor_name: str) -> str:
    """The module path owning a tensor: "model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj".

    Only a trailing ".weight"/".bias" is stripped; other names (buffers, ONNX names
    such as "onnx::MatMul_123") are their own layer. A bare "weight" belongs to the
    root module, whose path is "" as in torch's named_modules().
    """
    head, dot, last = tensor_name.rpartition(".")
    if last in _PARAM_SUFFIXES:
        return head if dot else ""
    return tensor_name


def group_layers(infos: Iterable[TensorInfo]) -> dict[str, list[TensorInfo]]:
    """Tensors grouped by layer_name, layers ordered by first appearance."""
    groups: dict[str, list[TensorInfo]] = {}
    for info in infos:
        groups.setdefault(layer_name(info.name), []).append(info)
    return groups
