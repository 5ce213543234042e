"""build_model: which builder a checkpoint gets, or None for a static-only audit."""

from __future__ import annotations

import os

import torch

from ..checkpoint import open_checkpoint
from ..errors import UsageError
from .factory import build_factory_model
from .hf import build_hf_model, is_hf_model_dir, optional_tokenizer
from .loaded import LoadedModel, parse_device
from .placement import PlacementSpec


def build_model(
    checkpoint: str | os.PathLike[str],
    model_spec: str | None = None,
    device: str | torch.device = "cpu",
    placement: PlacementSpec | None = None,
) -> LoadedModel | None:
    """A runnable float32 model in evaluation mode for `checkpoint`, or None when there is no architecture.

    * `model_spec` ("pkg.mod:factory" or "file.py:factory"): the factory's module,
      the checkpoint loaded into it strictly (any format the reader opens); a
      tokenizer is picked up when the checkpoint is a HF directory that has one;
    * a Hugging Face directory (config.json naming an architecture/model_type):
      built by transformers from local files;
    * anything else (bare safetensors, ONNX, state dicts): None, so the caller
      runs the static audit only.

    `placement` (--device-map, --max-memory) spreads a Hugging Face directory's model over
    devices with accelerate (model/placement.py).

    Raises UsageError (bad spec or device, transformers missing), ModelError
    (cannot build / does not match), CheckpointError (unreadable checkpoint).
    """
    parse_device(device)  # a typo in --device should not cost a model load first
    with open_checkpoint(checkpoint) as ckpt:  # headers only: validates and tells the kind
        kind, path, config = ckpt.kind, ckpt.path, ckpt.config
    if placement is not None and (model_spec is not None or kind != "hf" or not is_hf_model_dir(config)):
        raise UsageError(f"{checkpoint}: --device-map loads a Hugging Face directory (config.json beside the weights) "
                         "with accelerate; a --model factory or a bare checkpoint is built on one device")
    if model_spec is not None:
        loaded = build_factory_model(checkpoint, model_spec, device)
        if kind == "hf":
            loaded.tokenizer = optional_tokenizer(path)
        return loaded
    if kind == "hf" and is_hf_model_dir(config):
        assert config is not None
        return build_hf_model(path, config, device, placement)
    return None
