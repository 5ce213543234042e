"""A runnable model for the dynamic audit: the architecture, the calibration batch, the loss.

    model = build_model("examples/tiny-llama")          # HF dir, --model factory, or None
    batch = load_calibration("calib.safetensors", tokenizer=model.tokenizer)
    train, val = split_batch(batch)
    name, loss_fn = resolve_loss(None, model, train)    # "causal_lm"
    loss = checked_loss(loss_fn, model, train, name=name)

Everything raises the project's errors (UsageError, ModelError, DataError,
ResourceError, CheckpointError) with one-line messages; nothing is downloaded.
"""

from .build import build_model
from .call import call_model, logits_of, loss_of, model_inputs
from .data import Batch, MicroBatches, batch_size, load_calibration, split_batch, take, to_device, token_count
from .loaded import LoadedModel, forward_names
from .losses import LOSSES, LossFn, LossSpec, checked_loss, register_loss, resolve_loss, user_loss, verify_loss

__all__ = [
    "LOSSES",
    "Batch",
    "LoadedModel",
    "LossFn",
    "LossSpec",
    "MicroBatches",
    "batch_size",
    "build_model",
    "call_model",
    "checked_loss",
    "forward_names",
    "load_calibration",
    "logits_of",
    "loss_of",
    "model_inputs",
    "register_loss",
    "resolve_loss",
    "split_batch",
    "take",
    "to_device",
    "token_count",
    "user_loss",
    "verify_loss",
]
