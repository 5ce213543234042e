"""Forward and backward with given weights, through torch.func.functional_call.

Settings of a sweep share one module and one copy of its weights: each setting only
supplies the tensors its forward should see, so nothing is deep-copied.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..errors import DataError
from .targets import transposed_weights

Batch = Mapping[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


class _LossModule(nn.Module):
    """module + loss as one nn.Module, so functional_call can swap its weights."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(self.module, batch)


class LossEvaluator:
    def __init__(self, module: nn.Module, loss_fn: LossFn, where: str = "") -> None:
        self.wrapped = _LossModule(module, loss_fn)
        self.where = where
        # Conv1D weights arrive as (out, in) (targets.param_dict); the module gets W.T back
        self.transposed = transposed_weights(module)
        self.forwards = 0
        self.backwards = 0
        # why stacked_losses cannot run this model and loss under vmap (then it is not tried again)
        self.unbatchable: str | None = None

    def _as_module(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The module's own names and layouts: a transposed view of (out, in) Conv1D weights."""
        return {f"module.{k}": v.transpose(-2, -1) if k in self.transposed else v for k, v in weights.items()}

    def _call(self, weights: Mapping[str, Tensor], batch: Batch) -> Tensor:
        out = functional_call(self.wrapped, self._as_module(weights), (batch,))
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DataError(f"loss is not a scalar{self.where}: got {shape}")
        return out

    def _checked(self, value: float, what: str) -> float:
        if not math.isfinite(value):
            raise DataError(f"loss is {value} {what}{self.where}: check the calibration batch and the learning rate")
        return value

    @torch.no_grad()
    def loss(self, weights: Mapping[str, Tensor], batch: Batch, what: str = "") -> float:
        self.forwards += 1
        return self._checked(float(self._call(weights, batch)), what)

    def checked(self, value: float, what: str = "") -> float:
        """value, or the DataError loss() raises for a loss that is not finite."""
        return self._checked(value, what)

    @torch.no_grad()
    def stacked_losses(
        self, varying: Sequence[Mapping[str, Tensor]], shared: Mapping[str, Tensor], batch: Batch
    ) -> list[float] | None:
        """The loss at several weight sets in one call: each of `varying` holds the weights that
        differ between the sets (same keys in each), `shared` the rest. The sets are stacked and
        the module runs once under torch.func.vmap, so k moves cost one wide forward rather than
        k narrow ones (a GPU's gain). None, with `unbatchable` saying why, when vmap cannot run
        this model and loss (data-dependent control flow, randomness, an operator without a
        batching rule, out of memory): callers fall back to loss() per set, which also raises
        any error the loss itself has. Values are unchecked; not counted in `forwards`: callers
        count the forwards they stand for. vmap may sum in another order: ~1e-7 relative."""
        if self.unbatchable is not None or not varying:
            return None
        k = len(varying)
        try:
            stacked = self._as_module({name: torch.stack([w[name] for w in varying]) for name in varying[0]})
            fixed = {k: v for k, v in self._as_module(shared).items() if k not in stacked}

            def one(weights: dict[str, Tensor]) -> Tensor:
                return functional_call(self.wrapped, {**fixed, **weights}, (batch,))

            with warnings.catch_warnings():  # vmap's slow per-example fallback (SDPA on CPU) still runs correctly
                warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule.*")
                out = vmap(one)(stacked)
            if not isinstance(out, Tensor) or tuple(out.shape) != (k,):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"the loss under vmap gave {shape}, not one scalar per weight set")
            return [float(v) for v in out.float().cpu()]
        except Exception as e:  # vmap's limits are many and version-dependent: the loop is always right
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.unbatchable = f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__
            return None

    def loss_and_grad(
        self, weights: Mapping[str, Tensor], batch: Batch, what: str = "", wrt: Collection[str] | None = None
    ) -> tuple[float, dict[str, Tensor]]:
        """dL/dW for every weight given (the realized weights, as leaves), or for those in `wrt`
        only (the others enter the forward as constants, so autograd skips their gradients)."""
        chosen = set(weights) if wrt is None else set(wrt)
        inputs = {k: v.detach().requires_grad_(k in chosen) for k, v in weights.items()}
        leaves = {k: v for k, v in inputs.items() if k in chosen}
        self.forwards += 1
        self.backwards += 1
        with torch.enable_grad():
            loss = self._call(inputs, batch)
            value = self._checked(float(loss.detach()), what)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return value, {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads, strict=True)}
