"""Which parameters a setting may move: the universe of full fine-tuning, and LoRA targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import layer_name
from ..errors import UsageError
from ..safe_regex import check_name, compile_pattern
from .settings import TARGET_PRESETS

# The output head is not a LoRA target under all-linear (PEFT's convention): it maps
# to the vocabulary, and adapting it is a different plan.
_HEAD_NAMES = ("lm_head", "classifier", "score", "head", "qa_outputs", "cls.predictions.decoder")


@dataclass(frozen=True)
class ParamInfo:
    name: str  # parameter name as named_parameters() gives it (tied weights appear once)
    layer: str  # module path
    shape: tuple[int, ...]
    linear: bool  # the weight of an nn.Linear: a matrix LoRA can adapt


def parameter_universe(module: nn.Module) -> list[ParamInfo]:
    """Every float parameter full fine-tuning would move, in module order."""
    linear_weights = {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    out = []
    for name, p in module.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        out.append(ParamInfo(name, layer_name(name), tuple(p.shape), name in linear_weights and p.dim() == 2))
    return out


def is_head(layer: str) -> bool:
    """The output head (lm_head, a classifier): not a LoRA target under all-linear, and
    left in its own precision when a coarse format quantizes linear weights."""
    return any(layer == h or layer.endswith("." + h) for h in _HEAD_NAMES)


def _ends_with_any(layer: str, suffixes: tuple[str, ...]) -> bool:
    return any(layer == s or layer.endswith("." + s) for s in suffixes)


def _preset_matches(preset: str, layer: str) -> bool:
    """A preset's suffixes, with each layer in one preset only: BERT's MLP output
    (`output.dense`) is also the tail of its attention output (`attention.output.dense`)."""
    if not _ends_with_any(layer, TARGET_PRESETS[preset]):
        return False
    others = [p for p in TARGET_PRESETS if p != preset]
    return preset == "attention" or not any(_ends_with_any(layer, TARGET_PRESETS[o]) for o in others)


def select_targets(params: list[ParamInfo], targets: str) -> list[ParamInfo]:
    """Linear weights matching --targets: all-linear | attention | mlp | a regex over module paths."""
    linear = [p for p in params if p.linear]
    if targets == "all-linear":
        chosen = [p for p in linear if not is_head(p.layer)]
    elif targets in TARGET_PRESETS:
        chosen = [p for p in linear if _preset_matches(targets, p.layer)]
    else:
        pattern = compile_pattern(targets, "--targets")  # refused if unsafe to backtrack (safe_regex)
        chosen = [p for p in linear if pattern.search(check_name(p.layer, "--targets"))]
    if not chosen:
        names = ", ".join(p.layer for p in linear[:6]) + (" ..." if len(linear) > 6 else "")
        raise UsageError(f"--targets {targets!r} matches no linear layer of the model (linear layers: {names or 'none'})")
    return chosen


def param_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters() if p.dtype.is_floating_point}
