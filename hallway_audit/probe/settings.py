"""What a probe burst tries: a setting = precision stack x update subspace x optimizer.

Frozen dataclasses, so settings hash, compare and print the same everywhere; a
sweep is the grid (itertools.product) of the lists given on the command line, in a
plan YAML, or read from a PEFT adapter_config.json.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UsageError
from ..lattice import get_format
from ..safe_regex import check_name, compile_pattern

Rounding = Literal["nearest", "stochastic"]
Master = Literal["fp32", "none"]
SubspaceKind = Literal["full", "lora", "sparse"]
Scope = Literal["auto", "linear", "all"]
LoraBase = Literal["frozen", "merged"]

# Formats that training frameworks cast every parameter to (autocast, .to(dtype));
# coarser formats quantize linear-layer weights only (torchao, bitsandbytes, TE).
CAST_ALL_FORMATS = ("fp32", "bf16", "fp16")
MaskKind = Literal["magnitude", "random", "2:4"]

# --targets presets: module-name suffixes of the usual transformer projections.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense",
                  "c_attn", "attn.c_proj", "qkv_proj", "out_proj", "Wqkv",
                  "query_key_value", "attention.dense", "self_attention.dense", "self_attn.dense",  # NeoX, Falcon, Phi
                  "q_lin", "k_lin", "v_lin", "out_lin",  # DistilBERT
                  "SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",  # T5
                  "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o"),
    "mlp": ("gate_proj", "up_proj", "gate_up_proj", "down_proj", "intermediate.dense", "output.dense", "fc1", "fc2", "c_fc",
            "mlp.c_proj", "w1", "w2", "w3",
            "dense_h_to_4h", "dense_4h_to_h", "ffn.lin1", "ffn.lin2",  # NeoX / Falcon, DistilBERT
            "DenseReluDense.wi", "DenseReluDense.wo", "DenseReluDense.wi_0", "DenseReluDense.wi_1"),  # T5
}


@dataclass(frozen=True)
class PrecisionStack:
    weights: str = "fp32"
    activations: str | None = None
    rounding: Rounding = "nearest"
    master_weights: Master = "fp32"
    # Which parameters the weight format applies to (docs/definitions.md §4.3):
    # "auto" follows the frameworks (bf16/fp16 cast every parameter; fp8, fp6, fp4,
    # int, nf4 and MX formats quantize linear-layer weights only), "linear" / "all"
    # force one or the other ("all" is the behaviour of hallway-audit 0.3).
    scope: Scope = "auto"
    # What LoRA adapters are stored in: PEFT trains them in fp32 whatever the base.
    adapters: str = "fp32"

    def applies_to_all(self) -> bool:
        """Does the weight format apply to every parameter, or to linear weights only?"""
        if self.scope != "auto":
            return self.scope == "all"
        return self.weights in CAST_ALL_FORMATS

    @property
    def label(self) -> str:
        parts = [self.weights]
        if self.scope != "auto":
            parts.append(f"{self.scope} params")
        if self.activations:
            parts.append(f"act {self.activations}")
        if self.rounding == "stochastic":
            parts.append("SR")
        if self.master_weights == "none":
            parts.append("no master")
        if self.adapters != "fp32":
            parts.append(f"{self.adapters} adapters")
        return " ".join(parts)


@dataclass(frozen=True)
class Subspace:
    kind: SubspaceKind = "full"
    rank: int = 0
    targets: str = "all-linear"
    alpha: float | None = None  # None: alpha = rank (scale 1), PEFT's common choice
    rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()  # PEFT rank_pattern: regex/suffix -> rank
    sparsity: float = 0.0
    mask: MaskKind = "magnitude"
    # LoRA over a quantized base as PEFT / QLoRA run it: the base stays frozen in the
    # weight format and the forward is Q(W0) + s B A ("frozen"). "merged" rounds
    # W0 + s B A onto the format at every step (deploying merged low-precision weights).
    base: LoraBase = "frozen"

    def scale(self, rank: int) -> float:
        """LoRA's s: alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        alpha = float(self.alpha if self.alpha is not None else self.rank)
        return alpha / (rank**0.5 if self.rslora else rank)

    def rank_for(self, module: str) -> int:
        """The rank_pattern entry naming `module` (exactly, as a suffix, or as a full-match
        regex, checked by safe_regex), else the setting's rank."""
        if self.rank_pattern:
            check_name(module, "rank_pattern")
        for pattern, r in self.rank_pattern:
            if module == pattern or module.endswith("." + pattern) or compile_pattern(pattern, "rank_pattern").fullmatch(module):
                return r
        return self.rank

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "lora":
            extra = " rs" if self.rslora else ""
            return f"lora r{self.rank} {self.targets}{extra}"
        return f"sparse {self.sparsity:g} {self.mask}"


@dataclass(frozen=True)
class OptimizerSpec:
    kind: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.kind} lr {self.lr:g}"


@dataclass(frozen=True)
class Setting:
    precision: PrecisionStack = field(default_factory=PrecisionStack)
    subspace: Subspace = field(default_factory=Subspace)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)

    @property
    def id(self) -> str:
        """Short, unique within a sweep, stable across runs: used in findings and JSON."""
        p, s, o = self.precision, self.subspace, self.optimizer
        parts = [p.weights]
        if p.activations:
            parts.append(f"a{p.activations}")
        if p.rounding == "stochastic":
            parts.append("sr")
        if p.master_weights == "none":
            parts.append("nomaster")
        if p.scope != "auto":
            parts.append(f"q{p.scope}")
        if s.kind == "lora":
            parts.append(f"r{s.rank}" + (f"-{s.targets}" if s.targets != "all-linear" else "") + ("-rs" if s.rslora else "")
                         + ("-merged" if s.base == "merged" else "") + (f"-ad{p.adapters}" if p.adapters != "fp32" else ""))
        elif s.kind == "sparse":
            parts.append(f"sp{s.sparsity:g}-{s.mask}")
        else:
            parts.append("full")
        parts.append(f"{o.kind}-{o.lr:g}")
        return "/".join(parts)

    @property
    def bits(self) -> int:
        return get_format(self.precision.weights).bits

    @property
    def rank(self) -> int | None:
        """Rank for ordering settings: full fine-tuning counts as unbounded (None)."""
        return self.subspace.rank if self.subspace.kind == "lora" else None


# ----------------------------------------------------------------------------- parsing


def parse_rank(value: str | int) -> int:
    """'8' -> 8; '0' and 'full' -> 0 (full fine-tuning)."""
    text = str(value).strip().lower()
    if text in ("0", "full", "none"):
        return 0
    try:
        rank = int(text)
    except ValueError:
        raise UsageError(f"--rank must be a positive integer, 0 or 'full', not {value!r}") from None
    if rank < 0:
        raise UsageError(f"--rank must be a positive integer, 0 or 'full', not {value!r}")
    return rank


def parse_sparsity(value: str) -> tuple[float, MaskKind]:
    """'0.5' -> (0.5, magnitude); '0.5:random'; '2:4' -> (0.5, '2:4')."""
    text = str(value).strip().lower()
    if text in ("0", "none", ""):
        return 0.0, "magnitude"
    if text == "2:4":
        return 0.5, "2:4"
    frac, _, kind = text.partition(":")
    kind = kind or "magnitude"
    if kind not in ("magnitude", "random", "2:4"):
        raise UsageError(f"--sparsity mask must be magnitude, random or 2:4, not {kind!r}")
    try:
        fraction = float(frac)
    except ValueError:
        raise UsageError(f"--sparsity must be FRACTION[:magnitude|random|2:4], not {value!r}") from None
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"--sparsity fraction must be in [0, 1), not {fraction:g}")
    if kind == "2:4" and fraction != 0.5:
        raise UsageError("--sparsity 2:4 keeps exactly half of each group of 4: use '2:4' or '0.5:2:4'")
    return fraction, kind  # type: ignore[return-value]


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise UsageError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


@dataclass
class SweepSpec:
    """The lists a sweep is the product of (CLI flags, plan YAML and PEFT config merge into this)."""

    precision: list[str] = field(default_factory=lambda: ["fp32"])
    act_precision: list[str | None] = field(default_factory=lambda: [None])
    rounding: list[str] = field(default_factory=lambda: ["nearest"])
    master_weights: list[str] = field(default_factory=lambda: ["fp32"])
    rank: list[int] = field(default_factory=lambda: [0])
    targets: str = "all-linear"
    alpha: float | None = None
    rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    sparsity: list[tuple[float, MaskKind]] = field(default_factory=lambda: [(0.0, "magnitude")])
    lr: list[float] = field(default_factory=lambda: [1e-4])
    optimizer: list[str] = field(default_factory=lambda: ["adamw"])
    lora_base: LoraBase = "frozen"
    quantize: Scope = "auto"
    adapter_precision: str = "fp32"

    def settings(self) -> list[Setting]:
        for name in self.precision + [a for a in self.act_precision if a]:
            get_format(name)  # unknown names fail before any work
        for r in self.rounding:
            _choice("rounding", r, ("nearest", "stochastic"))
        for m in self.master_weights:
            _choice("master-weights", m, ("fp32", "none"))
        for o in self.optimizer:
            _choice("optimizer", o, ("adamw", "sgd"))
        for lr in self.lr:
            if not lr > 0:
                raise UsageError(f"--lr must be positive, not {lr:g}")
        out: list[Setting] = []
        for w, a, rnd, m, rank, (sp, mask), lr, opt in itertools.product(
            self.precision, self.act_precision, self.rounding, self.master_weights, self.rank, self.sparsity, self.lr,
            self.optimizer,
        ):
            if rank and sp:
                raise UsageError("--rank and --sparsity cannot be combined in one setting (LoRA adapters are dense)")
            if rank:
                sub = Subspace("lora", rank, self.targets, self.alpha, self.rslora, tuple(sorted(self.rank_pattern.items())),
                               base=self.lora_base)
            elif sp:
                sub = Subspace("sparse", 0, self.targets, sparsity=sp, mask=mask)
            else:
                sub = Subspace("full", targets=self.targets)
            prec = PrecisionStack(get_format(w).name, get_format(a).name if a else None, rnd, m,  # type: ignore[arg-type]
                                  scope=self.quantize, adapters=get_format(self.adapter_precision).name)
            out.append(Setting(prec, sub, OptimizerSpec(opt, lr)))  # type: ignore[arg-type]
        unique = list(dict.fromkeys(out))
        return unique


def dedupe(settings: Iterable[Setting]) -> list[Setting]:
    return list(dict.fromkeys(settings))


def from_mapping(spec: SweepSpec, data: Mapping[str, object], source: str) -> SweepSpec:
    """Apply a plan mapping's sweep keys (the CLI flag names, lists or scalars) onto a SweepSpec.

    Every key is checked by the plan's validation layer (`hallway_audit.plan.values`);
    keys that are not part of the sweep (steps, calib, rules, ...) are validated and
    left to `hallway_audit.plan.build_plan`, which merges whole plans.
    """
    from ..plan.values import canonical_key, check_value

    for raw, value in data.items():
        key = canonical_key(raw, source)
        checked = check_value(key, value, f"{source}: {raw}")
        if key in _SWEEP_KEYS:
            setattr(spec, key, checked)
    return spec


_SWEEP_KEYS = ("precision", "act_precision", "rounding", "master_weights", "rank", "targets", "alpha", "rslora",
               "rank_pattern", "sparsity", "lr", "optimizer")
