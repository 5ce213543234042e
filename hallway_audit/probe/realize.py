"""A setting applied to a model: the trainable state phi and the weights the forward sees.

Everything is expressed in weight space W (the model's own parameters), where psi,
beta and the p_t moves are defined:

* full:   phi = W for every parameter;
* sparse: phi = W * mask on the targets (pruned weights are zero and stay zero),
          other parameters train densely;
* lora:   phi = (A, B) per target, W = W0 + s * B @ A; other parameters frozen.

The forward sees Q(W) (nearest rounding onto the weight format; the
straight-through estimator is implicit because the backward is taken w.r.t. the
realized weights and mapped to phi by the chain rule) for the parameters the format
applies to: every parameter for bf16/fp16, linear-layer weights only for coarser
formats (PrecisionStack.scope). With master weights "none" phi itself lives on the
lattice: after each optimizer step it is rounded back with the setting's rounding
mode (nearest or stochastic). With fp32 master weights phi accumulates in fp32 and
the forward sees its rounding.

LoRA follows PEFT / QLoRA by default: the base is frozen on the weight format and
the forward sees Q(W0) + s B A, with the adapters stored in their own format
(fp32 unless PrecisionStack.adapters says otherwise). Subspace.base = "merged" rounds
W0 + s B A onto the format instead (a merged low-precision deployment).
See docs/definitions.md §4.2 and §4.3.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import UsageError
from ..lattice import Format, get_format
from .settings import Setting
from .targets import ParamInfo, is_head, select_targets

_SEP = "::"  # phi key for LoRA adapters: "<param name>::A"
_FP32 = get_format("fp32")


def _orthonormal_basis(m: Tensor) -> Tensor:
    """Columns spanning col(m), via SVD with a numerical-rank cut (empty for m = 0)."""
    if m.numel() == 0:
        return m.new_zeros(m.shape[0], 0)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return m.new_zeros(m.shape[0], 0)
    keep = s > s[0] * max(m.shape) * torch.finfo(m.dtype).eps
    return u[:, keep]


def tangent_projection(g: Tensor, a: Tensor, b: Tensor, bases: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """P_S(G) = P_B G + G P_A - P_B G P_A: the tangent space of W0 + s B A at (A, B).

    P_A, P_B are orthogonal projectors onto row(A) and col(B); at B = 0 this is G P_A.
    Bases are r columns, so this is O(out * in * r), never an n x n projector;
    `bases` = (basis of row(A), basis of col(B)) when the caller has them already.
    """
    qa, qb = bases if bases is not None else (_orthonormal_basis(a.T), _orthonormal_basis(b))
    ga = (g @ qa) @ qa.T
    if qb.shape[1] == 0:
        return ga
    return qb @ (qb.T @ g) + ga - qb @ (qb.T @ ga)


def magnitude_mask(w: Tensor, keep: float) -> Tensor:
    """Keep the largest-|w| fraction `keep` of a matrix (exact count, ties by index)."""
    n = w.numel()
    k = round(keep * n)
    mask = torch.zeros(n, dtype=torch.bool, device=w.device)
    if k:
        mask[torch.topk(w.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(w)


def random_mask(w: Tensor, keep: float, generator: torch.Generator) -> Tensor:
    n = w.numel()
    k = round(keep * n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    return mask.view_as(w).to(w.device)


def two_four_mask(w: Tensor) -> Tensor:
    """N:M = 2:4 along the input dimension: the 2 largest |w| of each group of 4."""
    if w.shape[-1] % 4:
        raise UsageError(f"2:4 sparsity needs an input dimension divisible by 4, got a {tuple(w.shape)} weight")
    groups = w.abs().reshape(-1, 4)
    idx = torch.topk(groups, 2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    return mask.view_as(w)


class Realization:
    def __init__(
        self,
        setting: Setting,
        params: list[ParamInfo],
        base: dict[str, Tensor],
        generator: torch.Generator,
        device_generator: torch.Generator | None = None,
    ) -> None:
        self.setting = setting
        self.params = params
        self.info = {p.name: p for p in params}
        self.fmt: Format = get_format(setting.precision.weights)
        self.quantizes = self.fmt.name != "fp32"
        self.all_params = setting.precision.applies_to_all()
        self.adapter_fmt: Format = get_format(setting.precision.adapters)
        self.merged = setting.subspace.base == "merged"
        self.master = setting.precision.master_weights
        self.rounding = setting.precision.rounding
        self.generator = generator  # CPU: initializations and masks
        self.device_generator = device_generator or generator  # stochastic rounding on the weights' device
        sub = setting.subspace
        self.kind = sub.kind
        self.masks: dict[str, Tensor] = {}
        self.lora: dict[str, tuple[float, int]] = {}  # param name -> (scale s, rank)
        self.base = base
        phi: dict[str, Tensor] = {}
        if sub.kind == "lora":
            self.trainable = [p.name for p in select_targets(params, sub.targets)]
            for name in self.trainable:
                w = base[name]
                rank = min(sub.rank_for(self.info[name].layer), *w.shape)
                # PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
                # B = 0, so W starts at W0. Drawn on the CPU generator: same A on any device.
                bound = 1.0 / math.sqrt(w.shape[1])
                a = torch.empty(rank, w.shape[1]).uniform_(-bound, bound, generator=generator).to(w.device)
                phi[name + _SEP + "A"] = a
                phi[name + _SEP + "B"] = torch.zeros(w.shape[0], rank, device=w.device)
                self.lora[name] = (sub.scale(rank), rank)
        else:
            self.trainable = [p.name for p in params]
            if sub.kind == "sparse":
                keep = 1.0 - sub.sparsity
                for p in select_targets(params, sub.targets):
                    w = base[p.name]
                    if sub.mask == "2:4":
                        self.masks[p.name] = two_four_mask(w)
                    elif sub.mask == "random":
                        self.masks[p.name] = random_mask(w, keep, generator)
                    else:
                        self.masks[p.name] = magnitude_mask(w, keep)
            for name in self.trainable:
                w = base[name].to(torch.float32).clone()
                if name in self.masks:
                    w = w * self.masks[name]
                phi[name] = w
        if self.master == "none":  # the stored values start on their lattice
            phi = {k: self.q(v, fmt=self.phi_format(k)) for k, v in phi.items()}
        self.phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        self._bases: dict[str, tuple[Tensor, Tensor]] = {}
        # What the forward sees of the parameters this setting does not move: fixed.
        moving = set(self.trainable)
        self.frozen = {name: self.q_param(name, base[name].to(torch.float32)) for name in base if name not in moving}
        # PEFT's frozen base: Q(W0) once, the adapters' product added in fp32.
        self.base_q = {} if self.merged else {name: self.q_param(name, base[name].to(torch.float32)) for name in self.lora}

    # -- the lattice ---------------------------------------------------------------
    def quantized(self, name: str) -> bool:
        """Does the weight format apply to parameter `name` (scope: all, or linear weights and
        stacked expert matrices)?"""
        info = self.info[name]
        return self.quantizes and (self.all_params or (info.matrix_weight and not is_head(info.layer)))

    def weight_format(self, name: str) -> Format | None:
        """The lattice the stored W-space value of trainable `name` lives on; None for a
        frozen-base LoRA target, whose moving part is its adapters (phi_format)."""
        if name in self.lora and not self.merged:
            return None
        return self.fmt if self.quantized(name) else _FP32

    def phi_format(self, key: str) -> Format:
        """The lattice a trainable value (a weight, or a LoRA adapter) is stored on."""
        if _SEP in key:
            return self.fmt if self.merged else self.adapter_fmt
        return self.fmt if self.quantized(key) else _FP32

    def q(self, w: Tensor, rounding: str = "nearest", fmt: Format | None = None) -> Tensor:
        """w rounded onto `fmt` (default: the weight format)."""
        fmt = self.fmt if fmt is None else fmt
        if fmt.name == "fp32":
            return w.detach()
        gen = self.device_generator if rounding == "stochastic" else None
        return fmt.at(w.detach()).quantize(w.detach(), rounding, gen)

    def q_param(self, name: str, w: Tensor, rounding: str = "nearest") -> Tensor:
        """What the forward sees of parameter `name` stored as w."""
        return self.q(w, rounding) if self.quantized(name) else w.detach()

    # -- weight space ----------------------------------------------------------------
    @torch.no_grad()
    def stored(self) -> dict[str, Tensor]:
        """Trainable weights in W space before the forward's rounding (merged for LoRA)."""
        out = {}
        for name in self.trainable:
            if name in self.lora:
                s, _ = self.lora[name]
                a, b = self.phi[name + _SEP + "A"], self.phi[name + _SEP + "B"]
                out[name] = self.base[name].to(torch.float32) + s * (b @ a)
            else:
                out[name] = self.phi[name].detach().clone()  # phi is updated in place
        return out

    @torch.no_grad()
    def realized(self, stored: dict[str, Tensor] | None = None, rounding: str = "nearest") -> dict[str, Tensor]:
        """Every parameter as the forward sees it: Q(W) for trainable, fixed Q(W0) for the
        rest, Q(W0) + (W - W0) for LoRA targets over a frozen base."""
        stored = self.stored() if stored is None else stored
        out = dict(self.frozen)
        for name, w in stored.items():
            if name in self.base_q:
                out[name] = self.base_q[name] + (w.detach() - self.base[name].to(torch.float32))
            else:
                out[name] = self.q_param(name, w, rounding)
        return out

    @property
    def move_rounding(self) -> str:
        """How a move lands on the lattice: the setting's rounding when phi lives on the
        lattice (no master weights); the forward's nearest cast of fp32 master weights."""
        return self.rounding if self.master == "none" else "nearest"

    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.phi.items()}

    @torch.no_grad()
    def restore(self, snap: dict[str, Tensor]) -> None:
        self._bases.clear()
        for k, v in snap.items():
            self.phi[k].copy_(v)

    @torch.no_grad()
    def phi_grad(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """dL/dphi from dL/dW of the realized weights (STE, then the chain rule)."""
        out = {}
        for name in self.trainable:
            g = grads[name]
            if name in self.lora:
                s, _ = self.lora[name]
                a, b = self.phi[name + _SEP + "A"], self.phi[name + _SEP + "B"]
                out[name + _SEP + "A"] = s * (b.T @ g)
                out[name + _SEP + "B"] = s * (g @ a.T)
            elif name in self.masks:
                out[name] = g * self.masks[name]
            else:
                out[name] = g
        return out

    @torch.no_grad()
    def to_weight_space(self, d_phi: dict[str, Tensor]) -> dict[str, Tensor]:
        """A phi-space direction as a W-space move (linearized for LoRA): it lies in S."""
        out = {}
        for name in self.trainable:
            if name in self.lora:
                s, _ = self.lora[name]
                a, b = self.phi[name + _SEP + "A"], self.phi[name + _SEP + "B"]
                out[name] = s * (d_phi[name + _SEP + "B"] @ a + b @ d_phi[name + _SEP + "A"])
            elif name in self.masks:
                out[name] = d_phi[name] * self.masks[name]
            else:
                out[name] = d_phi[name]
        return out

    def _lora_bases(self, name: str) -> tuple[Tensor, Tensor]:
        """Bases of row(A) and col(B), cached until phi changes (write_back, restore):
        p_t projects many samples at one state, and each SVD would be redone."""
        if name not in self._bases:
            a, b = self.phi[name + _SEP + "A"].detach(), self.phi[name + _SEP + "B"].detach()
            self._bases[name] = (_orthonormal_basis(a.T), _orthonormal_basis(b))
        return self._bases[name]

    @torch.no_grad()
    def project(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        """P_S in W space: identity (full), the mask (sparse), the tangent space (LoRA)."""
        out = {}
        for name in self.trainable:
            if name in self.lora:
                a, b = self.phi[name + _SEP + "A"], self.phi[name + _SEP + "B"]
                out[name] = tangent_projection(g[name], a, b, self._lora_bases(name))
            elif name in self.masks:
                out[name] = g[name] * self.masks[name]
            else:
                out[name] = g[name]
        return out

    @torch.no_grad()
    def gaussian(self, generator: torch.Generator) -> dict[str, Tensor]:
        """An isotropic Gaussian in S, in W space: P_S z for z ~ N(0, I) in distribution.

        For LoRA, P_S keeps three of the four blocks of z in the bases
        [Q_B, Q_B-perp] x [Q_A, Q_A-perp], each with iid N(0, 1) coefficients, so it is
        drawn from r x r + r x in + out x r numbers instead of out x in, and built
        with one out x 2r x in product: Q_B C Q_A^T + Q_B W (I - Q_A Q_A^T)
        + (I - Q_B Q_B^T) Y Q_A^T. Masks keep their entries; dense parameters are z.
        """
        out = {}
        drawn = generator.device  # drawn there, used on the weight's device (a device map spreads the weights)
        for name in self.trainable:
            w = self.base[name]
            device = w.device
            if name in self.lora:
                qa, qb = self._lora_bases(name)
                ra, rb = qa.shape[1], qb.shape[1]
                c = torch.randn(rb, ra, generator=generator, device=drawn).to(device)
                wr = torch.randn(rb, w.shape[1], generator=generator, device=drawn).to(device)
                y = torch.randn(w.shape[0], ra, generator=generator, device=drawn).to(device)
                wr = wr - (wr @ qa) @ qa.T
                y = y - qb @ (qb.T @ y)
                out[name] = torch.cat([qb, y], 1) @ torch.cat([c @ qa.T + wr, qa.T], 0)
            else:
                z = torch.randn(w.shape, generator=generator, device=drawn).to(device)
                out[name] = z * self.masks[name] if name in self.masks else z
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        """After an optimizer step: masks stay enforced; without master weights, phi
        is rounded back onto the lattice with the setting's rounding mode."""
        self._bases.clear()
        for name, m in self.masks.items():
            self.phi[name].mul_(m)
        if self.master == "none":
            for key, p in self.phi.items():
                fmt = self.phi_format(key)
                if fmt.name != "fp32":
                    p.copy_(self.q(p, self.rounding, fmt))

    def adapter_keys(self) -> list[str]:
        return [k for k in self.phi if _SEP in k]
