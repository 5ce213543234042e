"""Calibration batches: named tensors from disk (or text tokenized), validated, split, sampled.

A batch is a plain dict of tensors sharing a leading example dimension, so a
user's custom loss can index it without learning a class. Every check that can
be made without the model is made here, at load time, so a malformed file fails
before any model is built or step is taken.

Two kinds of batch: the built-in losses read known keys (input_ids,
attention_mask, labels or inputs, targets), which are checked by name; with a
user's loss function or a --model factory the batch is the user's (any named
numeric tensors, e.g. a_input_ids / b_input_ids for pairs), and only what every
batch must satisfy is checked: one shared, non-empty leading dimension, numbers,
finite values.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hallway_audit.errors import CheckpointError, DataError, UsageError

from ..checkpoint import open_checkpoint
from ..checkpoint.base import one_line, shown
from ..checkpoint.torch_reader import check_storage
from .loaded import parse_device

Batch = dict[str, torch.Tensor]
BatchView = Mapping[str, torch.Tensor]  # what reading a batch needs (the probe passes Mappings)

INPUT_KEYS = ("input_ids", "inputs")  # at least one must be present, or one of:
# the main input of transformers' vision / audio / speech models (their main_input_name),
# which the forward takes by name (call.model_inputs)
HF_MAIN_INPUTS = ("pixel_values", "input_values", "input_features", "inputs_embeds")
KNOWN_KEYS = ("input_ids", "attention_mask", "labels", "inputs", "targets")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
TEXT_SUFFIXES = (".txt", ".jsonl")
IGNORE_INDEX = -100  # the label torch and transformers skip in cross-entropy


# -- loading -------------------------------------------------------------------


def load_calibration(
    path: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    max_length: int = 128,
    device: str | torch.device = "cpu",
    user_batch: bool = False,
) -> Batch:
    """The calibration batch in `path`, validated, on `device`.

    Tensor files (.safetensors/.pt/.bin/.npz) hold named tensors: input_ids,
    attention_mask, labels (language models, classifiers) or inputs, targets
    (anything else). Integer tensors become int64 (what embeddings and
    cross-entropy take), floating ones float32 (the model runs in float32).
    Text (.txt: a line per example; .jsonl: {"text": ...} per line) is
    tokenized with `tokenizer`, padded to the longest, truncated at max_length.
    With `user_batch` (a user's loss or model reads the batch) any named
    numeric tensors are accepted: see `validate`.
    """
    p = Path(os.fspath(path))
    where = shown(p)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "no such file"
        raise DataError(f"{where}: calibration data: {what}")
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        batch = _tokenize(_read_texts(p, where), tokenizer, max_length, where)
    elif suffix in TENSOR_SUFFIXES:
        raw = _read_tensors(p, suffix, where)
        batch = {name: _normalise(name, value, where) for name, value in raw.items()}
    else:
        known = ", ".join(TENSOR_SUFFIXES + TEXT_SUFFIXES)
        raise DataError(f"{where}: unknown calibration format {p.suffix or '(no extension)'!r} (expected {known})")
    validate(batch, where, user_batch=user_batch)
    return to_device(batch, device)


def _read_tensors(p: Path, suffix: str, where: str) -> dict[str, Any]:
    if suffix == ".safetensors":
        try:  # the checkpoint reader validates the header and says what is wrong
            with open_checkpoint(p, reader="safetensors") as ckpt:
                return {info.name: ckpt.read(info.name) for info in ckpt.infos()}
        except CheckpointError as exc:
            raise DataError(f"calibration {exc.message}") from exc
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise DataError(f"{where}: holds Python objects (pickled arrays), not numbers: {one_line(exc)}") from exc
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{where}: not a readable .npz archive: {one_line(exc)}") from exc
    try:  # .pt / .pth / .bin
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{where}: holds Python objects that weights_only loading refuses; save a dict of tensors"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        raise DataError(f"{where}: not a readable torch file: {type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise DataError(f"{where}: holds a {type(obj).__name__}, not a dict of named tensors")
    check_storage(obj, where, DataError)  # an expand()ed tensor would be copied to its full size
    return obj


def _normalise(name: str, value: Any, where: str) -> torch.Tensor:
    """int64 for ids/masks/class labels, float32 for real values; anything else is refused."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{where}: {name!r} has numpy dtype {value.dtype}, not numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{where}: {name!r} is a {type(value).__name__}, not a tensor")
    if value.dtype == torch.bool or not (value.is_floating_point() or value.is_complex()):
        return value.to(torch.int64)
    if value.is_complex():
        raise DataError(f"{where}: {name!r} is complex ({value.dtype}); the audit takes real tensors")
    return value.to(torch.float32)


def _read_texts(p: Path, where: str) -> list[str]:
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot read as UTF-8 text: {one_line(exc)}") from exc
    if p.suffix.lower() == ".txt":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}:{number}: not valid JSON ({one_line(exc)})") from exc
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f'{where}:{number}: expected an object with a "text" string field')
        texts.append(text)
    return texts


def _tokenize(texts: list[str], tokenizer: Any | None, max_length: int, where: str) -> Batch:
    """input_ids/attention_mask from the tokenizer; labels = input_ids with padding set to -100."""
    if tokenizer is None:
        raise DataError(
            f"{where}: text calibration needs a tokenizer: the model directory has none; "
            "pass a tokenized .safetensors"
        )
    if not texts:
        raise DataError(f"{where}: no examples (the file has no non-empty lines)")
    if max_length < 1:
        raise UsageError(f"max_length must be at least 1, got {max_length}")
    if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
        # Common for causal LMs. Labels come from the attention mask, so a
        # padded eos is masked while a real eos is still scored.
        tokenizer.pad_token = tokenizer.eos_token
    try:
        encoded = tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_attention_mask=True,
        )
    except Exception as exc:
        raise DataError(f"{where}: the tokenizer failed: {type(exc).__name__}: {one_line(exc)}") from exc
    ids = encoded["input_ids"].to(torch.int64)
    mask = encoded["attention_mask"].to(torch.int64)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- validation ----------------------------------------------------------------


def validate(batch: Batch, where: str = "calibration batch", *, user_batch: bool = False) -> None:
    """Non-empty tensors sharing one leading dimension, finite floats; for the built-in
    losses (not `user_batch`) also an input key and masks shaped like ids.

    A user's loss decides what its keys mean, so only the promises every batch
    keeps (MicroBatches, split_batch and the evaluation batch index examples along
    dimension 0) are checked for it.
    """
    if not batch:
        raise DataError(f"{where}: no tensors in the calibration file")
    if not user_batch and not any(k in batch for k in (*INPUT_KEYS, *HF_MAIN_INPUTS)):
        raise DataError(
            f"{where}: no input_ids or inputs tensor (found: {', '.join(sorted(batch))}); expected "
            "input_ids, attention_mask, labels or inputs, targets (or a Hugging Face model's main "
            f"input: {', '.join(HF_MAIN_INPUTS)}), or pass --loss file.py:fn to train on other named tensors"
        )
    scalars = [k for k, v in batch.items() if v.dim() == 0]
    if scalars:
        raise DataError(f"{where}: {', '.join(scalars)} has no example dimension (a 0-d tensor)")
    leading = {k: v.shape[0] for k, v in batch.items()}
    if len(set(leading.values())) > 1:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
        raise DataError(f"{where}: tensors disagree on the number of examples (leading dimension): {shapes}")
    if next(iter(leading.values())) == 0:
        raise DataError(f"{where}: no examples (leading dimension 0)")
    empty = [f"{k} {tuple(v.shape)}" for k, v in batch.items() if v.numel() == 0]
    if empty:
        raise DataError(f"{where}: {', '.join(empty)} holds no values (a dimension of size 0)")
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    if not user_batch and ids is not None and mask is not None and mask.shape != ids.shape:
        raise DataError(
            f"{where}: attention_mask {tuple(mask.shape)} is not shaped like input_ids {tuple(ids.shape)}"
        )
    for name, value in batch.items():
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                nan = int(torch.isnan(value).sum())
                what = f"{nan} NaN" + (f" and {bad - nan} infinite" if bad > nan else "")
                raise DataError(f"{where}: {name!r} holds {what} value{'s' if bad > 1 else ''}")


# -- batch helpers -------------------------------------------------------------


def batch_size(batch: BatchView) -> int:
    """The number of examples (the shared leading dimension)."""
    if not batch:
        raise DataError("calibration batch is empty (no tensors)")
    return int(next(iter(batch.values())).shape[0])


def token_keys(batch: BatchView) -> list[str]:
    """Keys holding token ids: input_ids and any *_input_ids (a_input_ids, b_input_ids of pairs)."""
    return [k for k in batch if k == "input_ids" or k.endswith("_input_ids")]


def token_count(batch: BatchView) -> int:
    """Tokens a gradient rests on: every token-id tensor's tokens, counted by its attention
    mask (the key with the same prefix) when there is one; examples when there are no ids.

    A linear layer's gradient is a sum of one outer product per token it sees, so a
    pair batch's rank bound is the tokens of both sides.
    """
    keys = token_keys(batch)
    if not keys:  # e.g. inputs + attention_mask: the mask still counts the tokens
        masks = [v for k, v in batch.items() if k == "attention_mask" or k.endswith("_attention_mask")]
        return sum(int(m.sum()) for m in masks) if masks else batch_size(batch)
    total = 0
    for key in keys:
        ids = batch[key]
        mask = batch.get(key[: -len("input_ids")] + "attention_mask")
        total += int(mask.sum()) if mask is not None and mask.shape == ids.shape else ids.numel()
    return total


def to_device(batch: Batch, device: str | torch.device) -> Batch:
    dev = parse_device(device)
    return {k: v.to(dev) for k, v in batch.items()}


def take(batch: BatchView, index: torch.Tensor) -> Batch:
    """The examples at `index` (a 1-d int64 tensor on any device)."""
    return {k: v[index.to(v.device)] for k, v in batch.items()}


def split_batch(batch: Batch, val_fraction: float = 0.25, seed: int = 0) -> tuple[Batch, Batch]:
    """(train, held-out): a seeded permutation, round(N * val_fraction) held out, >= 1 each side.

    Each side keeps the file's example order, so a report can point at examples.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    n = batch_size(batch)
    if n < 2:
        raise DataError(
            f"calibration batch has {n} example: cannot split off a held-out part; pass more examples or --val"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, _ = perm[:n_val].sort()
    train_idx, _ = perm[n_val:].sort()
    return take(batch, train_idx), take(batch, val_idx)


class MicroBatches:
    """Resampled micro-batches (the g_b of the p_t proposal), reproducible from `seed`.

    Within an epoch examples are drawn without replacement; at the end of an
    epoch (fewer than `size` left) the order is reshuffled, so every micro-batch
    has exactly `size` distinct examples. `size` above N is clamped to N.
    """

    def __init__(self, batch: BatchView, size: int, seed: int) -> None:
        if size < 1:
            raise UsageError(f"micro-batch size must be at least 1, got {size}")
        self.batch = batch
        self.n = batch_size(batch)
        self.size = min(size, self.n)
        self.epoch = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(self.n, generator=self._generator)
        self._pos = 0

    def next_index(self) -> torch.Tensor:
        """Positions in the batch of the next micro-batch's examples."""
        if self._pos + self.size > self.n:
            self._order = torch.randperm(self.n, generator=self._generator)
            self._pos = 0
            self.epoch += 1
        index = self._order[self._pos : self._pos + self.size]
        self._pos += self.size
        return index

    def next(self) -> Batch:
        return take(self.batch, self.next_index())

    def full(self) -> BatchView:
        return self.batch

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return math.floor(self.n / self.size)
