"""Losses: a registry of name -> (function, description, batch keys it needs), plus user functions.

Every loss is `fn(module, batch) -> 0-d tensor`, the same signature a user's
`--loss module:function` has, so built-in and custom losses are called alike
by the probe. Losses do no validation per call (they run inside the burst
loop); `checked_loss` validates once, up front, with errors a user can act on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hallway_audit.errors import DataError, HallwayError, ResourceError, UnknownNameError, UsageError

from ..checkpoint.base import one_line
from ..limits import is_out_of_memory
from .call import LOSS_HINT, call_model, check_fits, logits_of, loss_of
from .data import IGNORE_INDEX, BatchView, batch_size, take
from .factory import import_object
from .loaded import OUT_OF_MEMORY, LoadedModel, forward_names

LossFn = Callable[[nn.Module, BatchView], torch.Tensor]


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


def causal_lm(module: nn.Module, batch: BatchView) -> torch.Tensor:
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


def cross_entropy(module: nn.Module, batch: BatchView) -> torch.Tensor:
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


def mse(module: nn.Module, batch: BatchView) -> torch.Tensor:
    """Mean squared error of the output against `targets`; shapes must match exactly (no broadcasting)."""
    targets = batch["targets"]
    prediction = logits_of(call_model(module, batch))
    if prediction.shape != targets.shape:
        raise DataError(
            f"mse needs the model output shaped like targets {tuple(targets.shape)}; "
            f"the model returned {tuple(prediction.shape)}"
        )
    return F.mse_loss(prediction.float(), targets.float())


def model_loss(module: nn.Module, batch: BatchView) -> torch.Tensor:
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


def auto_loss(kind: str, input_names: tuple[str, ...], batch: BatchView) -> str:
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


def callable_name(fn: object) -> str:
    """How a loss passed as a Python function is named in the report: module:qualname."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{qualname}" if module else str(qualname)


def user_loss(spec: str | LossFn | None) -> tuple[str, LossFn] | None:
    """(name, function) when `spec` is the user's loss: a callable, or module:function /
    file.py:function (imported here, so a typo fails before any data or model is
    loaded); None for a built-in name or no --loss. An unknown name is a UsageError."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        if not callable(spec):
            raise UsageError(
                f"loss must be a name ({', '.join(LOSSES)}), module:function or a function, not a {type(spec).__name__}"
            )
        return callable_name(spec), spec
    if spec in LOSSES:
        return None
    if ":" in spec:
        return spec, import_object(spec, option="--loss", what="function", error=UsageError)
    raise UnknownNameError("loss", spec, [*LOSSES, "module:function"])


def _headless(module: nn.Module, kind: str) -> bool:
    """A transformers base model (BertModel, LlamaModel): no head, so no logits and no loss.
    `base_model is module` alone also holds for T5ForConditionalGeneration (its prefix
    names no attribute), so a model with output embeddings or a task class is not one."""
    if kind != "hf" or getattr(module, "base_model", None) is not module:
        return False
    head = getattr(module, "get_output_embeddings", None)
    return "For" not in type(module).__name__ and (head is None or head() is None)


def resolve_loss(
    spec: str | LossFn | None, model: LoadedModel | nn.Module, batch: BatchView
) -> tuple[str, LossFn]:
    """(name shown in the report, function) for --loss `spec` (None: chosen by auto_loss).

    `spec` is a registered name, module:function / file.py:function, or a Python
    function fn(model, batch) -> scalar tensor.
    """
    user = user_loss(spec)
    if user is not None:
        return user
    module, kind, names = _parts(model)
    if spec is None and _headless(module, kind):
        raise UsageError(
            f"{type(module).__name__} has no head: it returns hidden states, not logits or a loss, "
            f"so no built-in loss applies; pass {LOSS_HINT}"
        )
    name = spec if isinstance(spec, str) else auto_loss(kind, names, batch)
    for alternatives in LOSSES[name].needs:
        if not any(key in batch for key in alternatives):
            raise DataError(
                f"loss {name!r} needs {' or '.join(map(repr, alternatives))} in the calibration "
                f"batch; it has {', '.join(sorted(batch))}"
            )
    return name, LOSSES[name].fn


def checked_loss(
    fn: LossFn,
    model: LoadedModel | nn.Module,
    batch: BatchView,
    *,
    name: str | None = None,
    where: str = "the calibration batch",
) -> torch.Tensor:
    """fn(module, batch), verified once: a finite 0-d tensor that depends on the parameters
    (the last only while gradients are enabled).

    Any failure inside the loss (shapes that don't fit the model, a user
    function's bug) becomes a one-line DataError naming the loss; out of
    memory becomes a ResourceError.
    """
    module, _, _ = _parts(model)
    what = f"loss {name!r}" if name else "loss"
    check_fits(module, batch, where)
    try:
        loss = fn(module, batch)
    except HallwayError:
        raise
    except OUT_OF_MEMORY as exc:
        raise ResourceError(f"out of memory computing {what}: {one_line(exc)}") from exc
    except Exception as exc:
        if is_out_of_memory(exc):  # torch's CPU allocator raises a plain RuntimeError: exit 6, not 8
            raise
        raise DataError(f"{what} failed on {where}: {type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(loss, torch.Tensor):
        raise DataError(f"{what} returned a {type(loss).__name__}, not a torch.Tensor")
    if loss.dim() != 0:
        raise DataError(
            f"{what} is not a scalar: shape {tuple(loss.shape)} (reduce it with .mean() or .sum())"
        )
    value = float(loss.detach())
    if math.isnan(value):
        raise DataError(f"{what} is NaN on {where}")
    if value in (float("inf"), float("-inf")):
        raise DataError(f"{what} is {value} on {where}")
    trainable = any(p.requires_grad for p in module.parameters())
    if torch.is_grad_enabled() and trainable and not loss.requires_grad:
        raise DataError(
            f"{what} does not depend on the model's parameters (no gradient flows to them)"
        )
    return loss


# Built-in losses whose integer labels index the model's last output dimension.
_CLASS_LABELS = ("causal_lm", "cross_entropy", "model_loss")


def check_labels(module: nn.Module, batch: BatchView, name: str, where: str) -> None:
    """Integer labels of a built-in loss inside the model's outputs (or -100, ignored).

    Cross-entropy past the last class is an IndexError on the CPU and a device-side
    assert on CUDA; one forward of one example tells the class count.
    """
    labels = batch.get("labels")
    if name not in _CLASS_LABELS or labels is None or labels.is_floating_point():
        return
    try:
        with torch.no_grad():
            classes = logits_of(call_model(module, take(batch, torch.arange(1)))).shape[-1]
    except Exception:  # the loss check names what is wrong with the output
        return
    scored = labels[labels != IGNORE_INDEX]
    if scored.numel() == 0:
        return
    low, high = int(scored.min()), int(scored.max())
    if low < 0 or high >= classes:
        bad = high if high >= classes else low
        raise DataError(
            f"{where}: labels hold {bad}, outside the model's {classes} outputs (0..{classes - 1}, or "
            f"{IGNORE_INDEX} to ignore a position)"
        )


def verify_loss(
    fn: LossFn,
    model: LoadedModel | nn.Module,
    train: BatchView,
    val: BatchView | None,
    *,
    name: str,
    micro_batch: int,
    train_where: str = "the calibration batch",
    val_where: str = "the held-out batch",
) -> None:
    """Everything the burst will ask of the loss, checked before any expensive work.

    Token ids and class labels of both batches against the model; the full check
    (finite scalar, depends on the parameters) on the first micro-batch, which
    fails in a fraction of a second; then every example of both batches without
    gradients, so a bad example is a DataError here rather than a crash mid-burst.
    """
    module, _, _ = _parts(model)
    for batch, where in ((train, train_where), (val, val_where)):
        if batch is not None:
            check_fits(module, batch, where)
            check_labels(module, batch, name, where)
    first = take(train, torch.arange(min(micro_batch, batch_size(train))))
    checked_loss(fn, model, first, name=name, where=train_where)
    with torch.no_grad():
        checked_loss(fn, model, train, name=name, where=train_where)
        if val is not None:
            checked_loss(fn, model, val, name=name, where=val_where)
