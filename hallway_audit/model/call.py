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

from .data import INPUT_KEYS, Batch
from .loaded import forward_names

TARGET_KEYS = ("labels", "targets")  # what a loss compares against, not a model input


def model_inputs(
    module: torch.nn.Module, batch: Batch, *, exclude: tuple[str, ...] = TARGET_KEYS
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(args, kwargs) for module(...): batch keys the forward names, the main input positionally if it names none.

    A forward(self, x) receives `inputs` (or `input_ids`) as x; a forward with
    named parameters receives exactly the batch keys it names, minus `exclude`.
    """
    names = forward_names(module)
    kwargs = {k: v for k, v in batch.items() if k in names and k not in exclude}
    main = next((k for k in INPUT_KEYS if k in batch), None)
    if main is None:
        raise DataError(f"calibration batch has no {' or '.join(INPUT_KEYS)} to feed the model")
    if any(k in kwargs for k in INPUT_KEYS):
        return (), kwargs
    return (batch[main],), kwargs


def call_model(module: torch.nn.Module, batch: Batch, *, exclude: tuple[str, ...] = TARGET_KEYS) -> Any:
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
    raise DataError(
        f"the model returned a {type(output).__name__} with no tensor, .logits or tensor first element"
    )


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


def check_fits(module: torch.nn.Module, batch: Batch) -> None:
    """Token ids inside the model's vocabulary: an embedding lookup past it fails with no useful message."""
    ids = batch.get("input_ids")
    get_embeddings = getattr(module, "get_input_embeddings", None)
    if ids is None or not callable(get_embeddings):
        return
    try:
        embeddings = get_embeddings()
    except Exception:  # a model without input embeddings (NotImplementedError in HF)
        return
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int) or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = high if high >= vocab else low
        raise DataError(
            f"calibration input_ids hold token id {bad}, outside the model's vocabulary of {vocab} "
            "(tokenized with another tokenizer?)"
        )
