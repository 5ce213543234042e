"""How big the model a config.json describes is, known before transformers builds it.

transformers allocates every parameter before it loads a single weight, so a
config.json with `vocab_size: 2**31` asks for 275 GB and one with
`num_hidden_layers: 10000000` makes it construct ten million modules first. Two
checks run before that, each refusing with exit 6 and the figures:

1. from the raw config.json fields, before transformers even parses it (some
   configs build per-layer lists in their constructor): the layer count against
   HALLWAY_AUDIT_MAX_LAYERS, and a lower bound on the parameters
   (vocab x hidden + layers x hidden^2 of the largest (sub)config) against memory;
2. the exact count, from building the architecture on the meta device (no
   memory behind the tensors; cheap once the layer count is bounded), in
   float32 -- the dtype the audit builds in -- against memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from hallway_audit.errors import ResourceError

from .. import limits

_VOCAB = ("vocab_size", "n_vocab", "padded_vocab_size")
_HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "hidden_dim", "embed_dim")
_LAYERS = (
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "encoder_layers",
    "decoder_layers",
)
FLOAT32_BYTES = 4


def _count(value: Any) -> int | None:
    """A config size field as an int (JSON may spell 4096 as 4096.0); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _first(section: dict[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        n = _count(section.get(key))
        if n is not None and n > 0:
            return n
    return 0


def _sections(config: dict[str, Any], depth: int = 0) -> Iterator[dict[str, Any]]:
    """The config and every nested sub-config (text_config, vision_config, encoder, ...)."""
    yield config
    if depth < 4:
        for value in config.values():
            if isinstance(value, dict):
                yield from _sections(value, depth + 1)


def layer_count(config: dict[str, Any]) -> tuple[int, str]:
    """The largest layer count any (sub)config declares, and the key that declares it."""
    best, key = 0, ""
    for section in _sections(config):
        for name in _LAYERS:
            n = _count(section.get(name))
            if n is not None and n > best:
                best, key = n, name
    return best, key


def params_lower_bound(config: dict[str, Any]) -> int:
    """Parameters the config cannot have fewer of: the token embedding and one
    hidden x hidden matrix per layer, of the largest (sub)config (sub-configs often
    repeat the top level's figures, so they are not added up)."""
    best = 0
    for section in _sections(config):
        hidden = _first(section, _HIDDEN)
        best = max(best, _first(section, _VOCAB) * hidden + _first(section, _LAYERS) * hidden * hidden)
    return best


def _refuse_if_too_big(params: int, how: str, where: str, device: str | torch.device) -> None:
    need = params * FLOAT32_BYTES
    available, source = limits.available_memory("cpu")
    places = [(available, source)]
    dev = torch.device(device)
    if dev.type == "cuda":
        places.append(limits.available_memory(dev))
    for free, source in places:
        if need > free:
            raise ResourceError(
                f"{where}config.json describes a model of {how} {limits.count(params)} parameters, "
                f"{limits.nbytes_text(need)} in float32; {limits.nbytes_text(free)} {source}: it cannot be built "
                f"(set {limits.MEMORY_ENV} to override the available figure)"
            )


def check_config_size(config: dict[str, Any], where: str, device: str | torch.device, *, memory: bool = True) -> None:
    """Refuse (exit 6) a config.json whose layer count or lower-bound size cannot be built;
    memory=False checks the layer count only (a device map spreads the model over devices)."""
    if memory:
        _refuse_if_too_big(params_lower_bound(config), "at least", where, device)
    layers, key = layer_count(config)
    limit = limits.max_layers()
    if layers > limit:
        raise ResourceError(
            f"{where}config.json: {key} {layers} is more than the limit of {limit} layers "
            f"(set {limits.MAX_LAYERS_ENV} to raise it)"
        )


def meta_param_count(build: Any) -> int | None:
    """Parameters and buffers of `build()` run on the meta device (no memory behind
    them); None when the architecture cannot be built there (the real build then
    reports its own error)."""
    try:
        with torch.device("meta"):
            module = build()
    except Exception:
        return None
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:  # tied weights count once
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def check_model_size(build: Any, where: str, device: str | torch.device) -> None:
    """Refuse (exit 6) when the exact float32 size of the architecture cannot fit."""
    params = meta_param_count(build)
    if params is not None:
        _refuse_if_too_big(params, "exactly", where, device)
