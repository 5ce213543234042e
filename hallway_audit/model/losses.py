"""Losses: a registry of name -> (function, description, batch keys it needs), plus user functions.

Every loss is `fn(module, batch) -> 0-d tensor`, the same signature a user's
`--loss module:function` has, so built-in and custom losses are called alike
by the probe. Losses do no validation per call (they run inside the burst
loop); `checked_loss` validates once, up front, with errors a user can act on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hallway_audit.errors import DataError, HallwayError, ResourceError, UnknownNameError, UsageError

from ..checkpoint.base import one_line
from .call import call_model, check_fits, logits_of, loss_of
from .data import IGNORE_INDEX, Batch
from .factory import import_object
from .loaded import OUT_OF_MEMORY, LoadedModel, forward_names

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    description: str
    # Each inner tuple: the batch must hold at least one of these keys.
    needs: tuple[tuple[str, ...], ...] = ()


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str, fn: LossFn, description: str, needs: tuple[tuple[str, ...], ...] = ()
) -> None:
    """Add a named loss (available to --loss and listed in its errors)."""
    if name in LOSSES:
        raise ValueError(f"a loss named {name!r} is already registered")
    LOSSES[name] = LossSpec(fn, description, needs)


# -- the built-in losses -------------------------------------------------------


def causal_lm(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy, mean over scored tokens, computed exactly as transformers does.

    Labels are batch["labels"] if present, else input_ids with padding
    (attention_mask == 0) ignored. Labels are padded with -100 and shifted left
    rather than the logits sliced, so the reduction matches HF's `.loss` bit
    for bit.
    """
    ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        mask = batch.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    elif labels.shape != ids.shape:
        raise DataError(
            f"causal_lm needs per-token labels shaped like input_ids {tuple(ids.shape)}; "
            f"labels has shape {tuple(labels.shape)}"
        )
    logits = logits_of(call_model(module, batch)).float()
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise DataError(
            f"causal_lm needs logits shaped (examples, tokens, vocab) = {tuple(ids.shape)} + (vocab,); "
            f"the model returned {tuple(logits.shape)}"
        )
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    if not bool((shifted != IGNORE_INDEX).any()):
        raise DataError("causal_lm: no token to score (every label after the first position is -100)")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )


def cross_entropy(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of logits against integer `labels`: one class per example or per token."""
    labels = batch["labels"]
    if labels.is_floating_point():
        raise DataError(
            f"cross_entropy needs integer class labels; labels is {labels.dtype} "
            "(real-valued outputs: name them 'targets' for mse)"
        )
    logits = logits_of(call_model(module, batch)).float()
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise DataError(
            f"cross_entropy needs logits shaped like labels {tuple(labels.shape)} plus a class "
            f"dimension; the model returned {tuple(logits.shape)}"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def mse(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean squared error of the output against `targets`; shapes must match exactly (no broadcasting)."""
    targets = batch["targets"]
    prediction = logits_of(call_model(module, batch))
    if prediction.shape != targets.shape:
        raise DataError(
            f"mse needs the model output shaped like targets {tuple(targets.shape)}; "
            f"the model returned {tuple(prediction.shape)}"
        )
    return F.mse_loss(prediction.float(), targets.float())


def model_loss(module: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own `.loss`, with every batch key its forward takes (labels included)."""
    return loss_of(call_model(module, batch, exclude=()))


register_loss(
    "causal_lm",
    causal_lm,
    "next-token cross-entropy (labels, else input_ids with padding ignored)",
    (("input_ids",),),
)
register_loss(
    "cross_entropy",
    cross_entropy,
    "cross-entropy of logits against integer labels (per example or per token)",
    (("labels",),),
)
register_loss("mse", mse, "mean squared error of the output against targets", (("targets",),))
register_loss("model_loss", model_loss, "the model's own .loss (forward called with labels)")


# -- choosing and checking -----------------------------------------------------


def _parts(model: LoadedModel | nn.Module) -> tuple[nn.Module, str, tuple[str, ...]]:
    if isinstance(model, LoadedModel):
        return model.module, model.kind, model.input_names
    return model, "factory", forward_names(model)


def auto_loss(kind: str, input_names: tuple[str, ...], batch: Batch) -> str:
    """The loss used without --loss; first rule that applies wins.

    1. `targets` in the batch          -> mse
    2. a Hugging Face causal LM         -> causal_lm
    3. `labels`, forward takes `labels` -> model_loss (every transformers head returns .loss then)
    4. `labels`                         -> cross_entropy
    otherwise a UsageError asking for --loss.
    """
    if "targets" in batch:
        return "mse"
    if kind == "hf-causal-lm":
        return "causal_lm"
    if "labels" in batch:
        return "model_loss" if "labels" in input_names else "cross_entropy"
    raise UsageError(
        f"cannot choose a loss: the calibration batch has {', '.join(sorted(batch))} (no labels or "
        f"targets) and the model is not a causal LM; pass --loss with one of "
        f"{', '.join(LOSSES)} or module:function"
    )


def resolve_loss(
    spec: str | None, model: LoadedModel | nn.Module, batch: Batch
) -> tuple[str, LossFn]:
    """(name shown in the report, function) for --loss `spec` (None: chosen by auto_loss)."""
    _, kind, names = _parts(model)
    if spec is not None and spec not in LOSSES:
        if ":" in spec:
            return spec, import_object(spec, option="--loss", what="function", error=UsageError)
        raise UnknownNameError("loss", spec, [*LOSSES, "module:function"])
    name = spec if spec is not None else auto_loss(kind, names, batch)
    for alternatives in LOSSES[name].needs:
        if not any(key in batch for key in alternatives):
            raise DataError(
                f"loss {name!r} needs {' or '.join(map(repr, alternatives))} in the calibration "
                f"batch; it has {', '.join(sorted(batch))}"
            )
    return name, LOSSES[name].fn


def checked_loss(
    fn: LossFn, model: LoadedModel | nn.Module, batch: Batch, *, name: str | None = None
) -> torch.Tensor:
    """fn(module, batch), verified once: a finite 0-d tensor that depends on the parameters.

    Any failure inside the loss (shapes that don't fit the model, a user
    function's bug) becomes a one-line DataError naming the loss; out of
    memory becomes a ResourceError.
    """
    module, _, _ = _parts(model)
    what = f"loss {name!r}" if name else "loss"
    check_fits(module, batch)
    try:
        loss = fn(module, batch)
    except HallwayError:
        raise
    except OUT_OF_MEMORY as exc:
        raise ResourceError(f"out of memory computing {what}: {one_line(exc)}") from exc
    except Exception as exc:
        raise DataError(
            f"{what} failed on the calibration batch: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if not isinstance(loss, torch.Tensor):
        raise DataError(f"{what} returned a {type(loss).__name__}, not a torch.Tensor")
    if loss.dim() != 0:
        raise DataError(
            f"{what} is not a scalar: shape {tuple(loss.shape)} (reduce it with .mean() or .sum())"
        )
    value = float(loss.detach())
    if value != value:
        raise DataError(f"{what} is NaN on the calibration batch")
    if value in (float("inf"), float("-inf")):
        raise DataError(f"{what} is {value} on the calibration batch")
    trainable = any(p.requires_grad for p in module.parameters())
    if torch.is_grad_enabled() and trainable and not loss.requires_grad:
        raise DataError(
            f"{what} does not depend on the model's parameters (no gradient flows to them)"
        )
    return loss
