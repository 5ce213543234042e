"""Calling a model on a batch, and reading logits / loss from whatever it returns.

Models disagree on both ends: HF forwards take named tensors (and would
compute their own loss if handed labels), a user's module often takes one
tensor positionally; outputs are tensors, tuples, or ModelOutput objects.
This is the one place that bridges them, so every loss calls models alike.
"""

from __future__ import annotations

from typing import Any

import torch

from hallway_audit.errors import DataError

from .data import INPUT_KEYS, BatchView, token_keys
from .loaded import forward_names

TARGET_KEYS = ("labels", "targets")  # what a loss compares against, not a model input
# What an encoder without a head (transformers' BertModel, a sentence embedder) returns.
HIDDEN_KEYS = ("last_hidden_state", "pooler_output", "hidden_states")
LOSS_HINT = (
    "--loss file.py:fn, a function fn(model, batch) -> scalar tensor (e.g. a contrastive loss "
    "on mean-pooled embeddings)"
)


def model_inputs(
    module: torch.nn.Module, batch: BatchView, *, exclude: tuple[str, ...] = TARGET_KEYS
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(args, kwargs) for module(...): batch keys the forward names, the main input positionally if it names none.

    A forward(self, x) receives `inputs` (or `input_ids`) as x; a forward with
    named parameters receives exactly the batch keys it names, minus `exclude`
    (a forward(self, features, mask) or (self, pixel_values) needs no input_ids).
    """
    names = forward_names(module)
    kwargs = {k: v for k, v in batch.items() if k in names and k not in exclude}
    if any(k in kwargs for k in INPUT_KEYS):
        return (), kwargs
    main = next((k for k in INPUT_KEYS if k in batch), None)
    if main is not None:
        return (batch[main],), kwargs
    if kwargs:
        return (), kwargs
    takes = ", ".join(names) if names else "no named parameters"
    raise DataError(
        f"calibration batch has no {' or '.join(INPUT_KEYS)} and no key the model's forward takes "
        f"({takes}); it has {', '.join(sorted(batch))}: pass --loss file.py:fn to feed the model yourself"
    )


def call_model(module: torch.nn.Module, batch: BatchView, *, exclude: tuple[str, ...] = TARGET_KEYS) -> Any:
    """module(...) on the batch, inputs chosen by model_inputs."""
    args, kwargs = model_inputs(module, batch, exclude=exclude)
    return module(*args, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor: the output itself, its .logits, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = [k for k in HIDDEN_KEYS if _field(output, k) is not None]
    if hidden:
        raise DataError(
            f"the model returns hidden states ({type(output).__name__}: {', '.join(hidden)}), not logits or a "
            f"loss: pass {LOSS_HINT}"
        )
    raise DataError(
        f"the model returned a {type(output).__name__} with no tensor, .logits or tensor first element"
    )


def _field(output: Any, key: str) -> Any:
    value = getattr(output, key, None)
    if value is None and isinstance(output, dict):
        value = output.get(key)
    return value


def loss_of(output: Any) -> torch.Tensor:
    """The model's own loss (its .loss), which HF heads compute when given labels."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise DataError(
            f"the model returned a {type(output).__name__} without a .loss; does its forward take "
            "labels? use --loss cross_entropy or --loss module:function"
        )
    return loss


def check_fits(module: torch.nn.Module, batch: BatchView, where: str = "the calibration batch") -> None:
    """Token ids inside the model's vocabulary: an embedding lookup past it fails with no useful
    message (on CUDA, a device-side assert). Checks input_ids and every *_input_ids (pairs)."""
    keys = token_keys(batch)
    get_embeddings = getattr(module, "get_input_embeddings", None)
    if not keys or not callable(get_embeddings):
        return
    try:
        embeddings = get_embeddings()
    except Exception:  # a model without input embeddings (NotImplementedError in HF)
        return
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int):
        return
    for key in keys:
        ids = batch[key]
        if ids.numel() == 0 or ids.is_floating_point():
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = high if high >= vocab else low
            raise DataError(
                f"{where}: {key} holds token id {bad}, outside the model's vocabulary of {vocab} "
                "(tokenized with another tokenizer?)"
            )
