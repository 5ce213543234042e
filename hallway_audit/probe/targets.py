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
    shape: tuple[int, ...]  # as the probe holds it: (out, in) for every linear weight
    linear: bool  # the weight of a linear layer (nn.Linear, Conv1D): a matrix LoRA can adapt
    transposed: bool = False  # a Conv1D weight: stored (in, out), held by the probe as (out, in)
    # a 3-D stack of expert matrices (transformers' fused MoE experts, `mlp.experts.gate_up_proj`):
    # fp8 / int / nf4 / MX recipes quantize it like linear weights; LoRA cannot adapt it
    stacked: bool = False

    @property
    def matrix_weight(self) -> bool:
        """A weight a coarse format quantizes (when it is not the output head)."""
        return self.linear or self.stacked


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, GPT-J's ancestors...): y = x @ W + b with W stored
    (in, out). PEFT adapts it as a linear layer (fan_in_fan_out) and bitsandbytes
    quantizes it transposed, so the probe holds its weight as the (out, in) matrix."""
    weight = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(m, "nf")


def linear_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Module path -> layer for every linear layer: nn.Linear and Conv1D."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def linear_dims(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer, whichever way it stores its weight."""
    weight = m.get_parameter("weight")  # (out, in) for nn.Linear, (in, out) for Conv1D
    rows, cols = (int(n) for n in weight.shape)
    return (rows, cols) if is_conv1d(m) else (cols, rows)


def transposed_weights(module: nn.Module) -> set[str]:
    """Parameter names of Conv1D weights: the probe holds them as W.T (out, in), and the
    forward takes them back as a transposed view, so gradients arrive as (out, in) too."""
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if is_conv1d(m)}


def parameter_universe(module: nn.Module) -> list[ParamInfo]:
    """Every float parameter full fine-tuning would move, in module order."""
    linear_weights = {f"{name}.weight" if name else "weight" for name in linear_modules(module)}
    transposed = transposed_weights(module)
    out = []
    for name, p in module.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        shape = tuple(p.shape)[::-1] if name in transposed else tuple(p.shape)
        layer = layer_name(name)
        owner = name.split(".")[-2] if "." in name else ""  # the module holding the parameter
        stacked = p.dim() == 3 and owner.lower().endswith("experts")
        out.append(ParamInfo(name, layer, shape, name in linear_weights and p.dim() == 2, name in transposed, stacked))
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
    """Every float parameter as the probe holds it: Conv1D weights as (out, in) copies."""
    transposed = transposed_weights(module)
    return {name: p.detach().T.contiguous() if name in transposed else p.detach()
            for name, p in module.named_parameters() if p.dtype.is_floating_point}
