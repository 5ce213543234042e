"""Which layers a planned weight format applies to (docs/definitions.md §4.3).

Frameworks cast every parameter to bf16 / fp16, but quantize only linear-layer
weights to fp8, int, nf4 or MX formats: norms, biases, embeddings and the output head
keep their own precision (bitsandbytes and torchao leave the head out). Static
figures of a format on a layer it does not apply to describe nothing the plan does,
so rules do not see them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from .probe.settings import CAST_ALL_FORMATS
from .probe.targets import ParamInfo, is_head

# (format, layer) -> does the format apply to the layer under the plan?
FormatScope = Callable[[str, str], bool]

# Embedding tables by their usual module names (a checkpoint without a model says no more)
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_positions|embeddings?|word_embeddings|position_embeddings|"
                        r"token_type_embeddings|wte|wpe|shared|tok_embeddings)$")


def quantized_linear_layers(params: Iterable[ParamInfo]) -> set[str]:
    """Layers whose weight a coarse format quantizes, from the model: nn.Linear weights
    and fused MoE expert stacks, other than the output head."""
    return {p.layer for p in params if p.matrix_weight and not is_head(p.layer)}


def guessed_linear_layers(layers: Iterable[tuple[str, Iterable[tuple[int, ...]]]]) -> set[str]:
    """The same guessed from a checkpoint alone (no architecture): layers holding a matrix
    whose name is neither an embedding nor an output head."""
    return {name for name, shapes in layers
            if any(len(s) == 2 for s in shapes) and not _EMBEDDING.search(name) and not is_head(name)}


def format_scope(quantize: str, linear_layers: set[str]) -> FormatScope:
    """quantize: the plan's auto | linear | all (--quantize)."""
    def applies(fmt: str, layer: str) -> bool:
        if quantize == "all" or (quantize == "auto" and fmt in CAST_ALL_FORMATS):
            return True
        return layer in linear_layers

    return applies
