"""Loading a checkpoint into a module strictly: every key, every shape, or one error.

torch's load_state_dict(strict=True) stops at the first kind of problem and
prints a paragraph; here every missing key, unexpected key and shape mismatch
is collected before any data is read, and reported as one line a user can act
on. Tensors are read one at a time (the checkpoint may not fit twice in RAM)
and copied in place, so parameters the module ties together stay tied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from hallway_audit.errors import ModelError

from ..checkpoint import Checkpoint
from ..checkpoint.base import shown

SHOWN = 3  # names listed per kind of problem; the count says how many more
# Prefixes that training wrappers add to every key: DistributedDataParallel and
# torch.compile. Stripped only when *every* checkpoint key has one and no model
# key does, so a model that really has a submodule named "module" is unaffected.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _names(items: Sequence[str]) -> str:
    head = ", ".join(items[:SHOWN])
    return head + (", ..." if len(items) > SHOWN else "")


def _shape(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))


def mismatch_message(
    where: str,
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    """'model does not match W: 2 missing (a, b), 1 unexpected (c), 1 shape mismatch (d: model (2,), checkpoint (3,))'.

    `mismatched` holds (name, model shape, checkpoint shape).
    """
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_names(sorted(missing))})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(sorted(unexpected))})")
    if mismatched:
        rows = sorted(mismatched)
        shown_rows = [f"{n}: model {_shape(m)}, checkpoint {_shape(c)}" for n, m, c in rows[:SHOWN]]
        more = ", ..." if len(rows) > SHOWN else ""
        noun = "shape mismatch" if len(rows) == 1 else "shape mismatches"
        parts.append(f"{len(rows)} {noun} ({', '.join(shown_rows)}{more})")
    return f"model does not match {where}: " + ", ".join(parts)


def _key_map(checkpoint_names: list[str], model_names: set[str]) -> dict[str, str]:
    """checkpoint name -> model name, undoing a wrapper prefix that covers every key."""
    for prefix in WRAPPER_PREFIXES:
        if (
            checkpoint_names
            and all(n.startswith(prefix) for n in checkpoint_names)
            and not any(n.startswith(prefix) for n in model_names)
        ):
            return {n: n[len(prefix):] for n in checkpoint_names}
    return {n: n for n in checkpoint_names}


def _storage_key(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
    """Identity of a tensor's memory: equal for tied parameters. None for empty tensors (ptr 0)."""
    if t.numel() == 0:
        return None
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def load_strict(module: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Copy every checkpoint tensor into `module` (cast to the target's dtype), or raise one ModelError.

    A module key absent from the checkpoint is fine only when the module ties
    it to a key that is present (same memory: e.g. lm_head.weight tied to the
    embedding, which save_pretrained stores once).
    """
    targets = module.state_dict(keep_vars=True)  # names -> the live Parameters/buffers
    infos = {info.name: info for info in ckpt.infos()}
    to_model = _key_map(list(infos), set(targets))

    present = {to_model[n] for n in infos if to_model[n] in targets}
    unexpected = [n for n in infos if to_model[n] not in targets]
    loaded_storage = {_storage_key(targets[k]) for k in present} - {None}
    missing = [
        k for k in targets if k not in present and _storage_key(targets[k]) not in loaded_storage
    ]
    mismatched = [
        (to_model[n], tuple(targets[to_model[n]].shape), info.shape)
        for n, info in infos.items()
        if to_model[n] in targets and tuple(targets[to_model[n]].shape) != info.shape
    ]
    if missing or unexpected or mismatched:
        raise ModelError(mismatch_message(shown(ckpt.path), missing, unexpected, mismatched))

    with torch.no_grad():
        for name in infos:  # file order: sequential reads, one tensor resident at a time
            target = targets[to_model[name]]
            target.copy_(ckpt.read(name).to(dtype=target.dtype))
