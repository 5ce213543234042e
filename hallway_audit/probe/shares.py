"""Each example's share of the LoRA adapter gradient, from one backward over the split.

The optimizer proposal of p_t draws a fresh micro-batch gradient g_b for every
sample; computed directly, that is one forward and backward per sample, the largest
cost of p_t after the moves themselves. For a linear layer y = x W^T the weight
gradient is G = sum over tokens of delta x^T (delta = dL/dy), and an example's part
of it involves only its own tokens; LoRA's adapter gradients are s B^T G and
s G A^T, so an example's share is r x in + out x r numbers, computed from x and delta
while the backward of the whole training split (which p_t runs anyway, for the
surrogate) passes through the layer.

g_b is then a positive multiple of the sum of its examples' shares for any loss that
is a weighted mean of per-example terms (token mean, example mean), and the proposal
normalizes g_b, so the multiple cancels. Whether a loss is of that form is checked,
not assumed: the caller compares the first micro-batch at each state against a
direct gradient (`agrees_with`) and falls back to direct gradients when it differs.
A loss that couples examples (in-batch contrastive: each example's term depends on
the others) fails that check at every state, so the first failure is remembered
(`SharesVerdict`, one per setting) and the setting's later states record no shares.
Each setting decides for itself, so its numbers do not depend on which settings ran
before it (in one process, or on which torchrun rank).
Every fallback carries its reason, reported with p_t as `g_b_reason`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .realize import Realization
from .targets import is_conv1d

_SEP = "::"
# ||shares - direct|| / ||direct|| above this means the loss does not split by example
# (float32 sums in another order differ by ~1e-6).
AGREEMENT = 1e-3


COUPLED = (
    "per-example shares disagree with the micro-batch gradient (the loss couples examples, e.g. "
    "in-batch contrastive); p_t uses a direct backward per sample (slower)"
)
NOT_LORA = "full and sparse settings take a direct backward per sample (their per-example shares would be model-sized)"
NOT_LINEAR = "a LoRA target is not an nn.Linear weight: p_t takes a direct backward per sample"
FOLDED = "a LoRA target layer does not see the examples in its first dimension: p_t takes a direct backward per sample"


class SharesVerdict:
    """What the agreement check found about the loss, shared by the states of one setting's
    burst: once a loss is found to couple examples, no later state records shares."""

    def __init__(self) -> None:
        self.coupled = False

    @property
    def reason(self) -> str | None:
        return COUPLED if self.coupled else None


class ExampleShares:
    """Per-example phi gradients of a LoRA setting's adapters, recorded by hooks."""

    def __init__(self, module: nn.Module, real: Realization, examples: int) -> None:
        self.real = real
        self.examples = examples
        self.modules = {name: module.get_submodule(real.info[name].layer) for name in real.lora}
        self.shares: dict[str, Tensor] = {}  # phi key -> [examples, *phi shape]
        self.usable = True

    @staticmethod
    def supported(module: nn.Module, real: Realization) -> bool:
        """LoRA on nn.Linear weights only: full and sparse settings train parameters whose
        per-example gradients would cost examples x their size."""
        return ExampleShares.unsupported_reason(module, real) is None

    @staticmethod
    def unsupported_reason(module: nn.Module, real: Realization) -> str | None:
        """Why this setting's g_b cannot come from shares; None when it can."""
        if real.kind != "lora" or not real.lora:
            return NOT_LORA
        for name in real.lora:
            info = real.info[name]
            if name != (f"{info.layer}.weight" if info.layer else "weight"):
                return NOT_LINEAR
            layer = module.get_submodule(info.layer)
            if not (isinstance(layer, nn.Linear) or is_conv1d(layer)):  # both see x (.., in), give (.., out)
                return NOT_LINEAR
        return None

    def _accumulate(self, name: str, x: Tensor, delta: Tensor) -> None:
        if x.shape[0] != self.examples or delta.shape[0] != self.examples:
            self.usable = False  # the layer does not see the batch dimension first
            return
        s, _ = self.real.lora[name]
        a = self.real.phi[name + _SEP + "A"].detach()
        b = self.real.phi[name + _SEP + "B"].detach()
        x = x.reshape(self.examples, -1, x.shape[-1]).to(a.dtype)
        delta = delta.reshape(self.examples, -1, delta.shape[-1]).to(a.dtype)
        share_b = s * torch.einsum("nto,ntr->nor", delta, x @ a.T)  # s G_i A^T
        share_a = s * torch.einsum("ntr,nti->nri", delta @ b, x)  # s B^T G_i
        for key, share in ((name + _SEP + "A", share_a), (name + _SEP + "B", share_b)):
            self.shares[key] = self.shares[key] + share if key in self.shares else share

    @contextmanager
    def recording(self) -> Iterator[ExampleShares]:
        """Hooks on the target layers for one forward and backward of all examples
        (a layer called several times adds up its calls, as autograd does)."""

        def hook_for(name: str):
            def forward_hook(_module: nn.Module, inputs: tuple, output: Tensor) -> None:
                if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
                    return
                x = inputs[0].detach()
                output.register_hook(lambda delta: self._accumulate(name, x, delta.detach()))

            return forward_hook

        self.shares.clear()
        self.usable = True
        handles = [m.register_forward_hook(hook_for(name)) for name, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        if self.shares:
            for key in self.real.phi:  # a target whose output never reached the loss
                self.shares.setdefault(key, torch.zeros(self.examples, *self.real.phi[key].shape,
                                                        device=self.real.phi[key].device))
        else:
            self.usable = False

    def micro_batch(self, index: Tensor) -> dict[str, Tensor]:
        """phi gradient of the examples at `index`, up to a positive factor."""
        return {k: v[index.to(v.device)].sum(0) for k, v in self.shares.items()}

    def agrees_with(self, index: Tensor, direct: dict[str, Tensor]) -> bool:
        """Do the shares of these examples point where the direct gradient does?"""
        mine = self.micro_batch(index)
        first = next(iter(direct.values())).device  # one device for the comparison (device maps spread phi)
        a = torch.cat([mine[k].double().flatten().to(first) for k in direct])
        b = torch.cat([direct[k].double().flatten().to(first) for k in direct])
        n_mine, n_direct = float(a.norm()), float(b.norm())
        if n_direct == 0.0 or n_mine == 0.0:
            return n_direct == n_mine
        # the factor between them is free (loss normalization): compare directions
        dot = float(a @ b)
        return dot > 0 and float((dot / n_mine**2 * a - b).norm()) <= AGREEMENT * n_direct
