"""What a sweep will cost, before it runs: forward and backward passes, work units, memory.

The counts follow run_burst and measure_pt pass by pass, for every sample drawn (no
early stop), no blocked move (a move that rounds to nothing needs no forward) and,
for LoRA, the optimizer proposal's g_b from per-example shares (one direct forward
and backward at the first sample of each state, to check them). Early stopping and
blocked moves only lower the real counts; a loss whose shares disagree with the
direct gradient raises them by one forward and backward per optimizer sample.

A work unit is one example through a forward pass; a backward counts as two (the
usual cost ratio). Units are what a progress display divides elapsed time by: on
one device the time of a pass is close to proportional to its examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lattice import get_format
from .events import BurstEvent
from .pt import FIRST_CHECK
from .targets import ParamInfo, select_targets

if TYPE_CHECKING:
    from ..memory import MemoryEstimate
    from .burst import BurstOptions
    from .settings import Setting

FLOAT32 = 4


def pt_states(steps: int, p_every: int) -> list[int]:
    """The burst states p_t is measured at: first and last, and every p_every steps."""
    extra = set(range(0, steps, p_every)) if p_every else set()
    return sorted({0, steps} | extra)


@dataclass(frozen=True)
class Passes:
    """Forward and backward passes and their work units (examples forwarded, a backward x 2)."""

    forwards: int = 0
    backwards: int = 0
    units: int = 0

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.forwards + other.forwards, self.backwards + other.backwards, self.units + other.units)

    def __mul__(self, n: int) -> Passes:
        return Passes(self.forwards * n, self.backwards * n, self.units * n)

    __rmul__ = __mul__


def forward(examples: int) -> Passes:
    return Passes(1, 0, examples)


def forward_backward(examples: int) -> Passes:
    return Passes(1, 1, 3 * examples)


NOTHING = Passes()


@dataclass(frozen=True)
class BatchSizes:
    """Examples per pass: the training split (its gradient), the held-out batch (0: none),
    the fixed evaluation batches and the micro-batch of a step."""

    train: int
    val: int
    eval: int
    eval_val: int
    micro: int

    @classmethod
    def of(cls, train: int, val: int, options: BurstOptions) -> BatchSizes:
        return cls(train, val, min(options.eval_batch, train), min(options.eval_batch, val),
                   min(options.micro_batch, train))


@dataclass(frozen=True)
class SettingEstimate:
    """One setting's burst and p_t, piece by piece, as the burst runs them."""

    setting: str
    steps: int
    states: tuple[int, ...]  # burst states p_t is measured at
    samples: int
    early_stop: bool
    layers: int  # layers sampled one by one with --per-layer-p (0: off)
    shares: bool  # LoRA: g_b from per-example shares after one direct check per state
    trainable: int  # numbers the optimizer moves (phi)
    optimizer_state: int  # numbers the optimizer keeps (AdamW: 2 per phi, SGD with momentum: 1)
    start: Passes  # starting losses and the training split's gradient
    end: Passes  # after p_t: the loss at the final master weights (where they are rounded)
    step: Passes  # one optimizer step with its realized losses
    setups: tuple[Passes, ...]  # per state: losses and gradients before any sample
    optimizer_first: Passes  # the first optimizer sample of a state
    optimizer_sample: Passes  # every later one
    uniform_sample: Passes
    layer_sample: Passes

    @property
    def burst(self) -> Passes:
        return self.start + self.step * self.steps

    @property
    def fixed(self) -> Passes:
        """The pieces that always run: the burst and each state's setup (early stopping
        skips samples only)."""
        out = self.burst + self.end
        for setup in self.setups:
            out = out + setup
        return out

    def state_total(self, i: int, samples: int | None = None) -> Passes:
        """A measured state's passes when each proposal draws `samples` (default: all)."""
        n = self.samples if samples is None else samples
        optimizer = self.optimizer_first + self.optimizer_sample * (n - 1) if n else NOTHING
        return self.setups[i] + optimizer + self.uniform_sample * n + self.layer_sample * (n * self.layers)

    @property
    def total(self) -> Passes:
        """Every sample drawn: the most the setting can run."""
        out = self.burst + self.end
        for i in range(len(self.states)):
            out = out + self.state_total(i)
        return out

    @property
    def least(self) -> Passes:
        """Every proposal stopped at its first early-stopping check: the least it usually runs
        (blocked moves, which need no forward, can lower it further)."""
        n = min(self.samples, FIRST_CHECK) if self.early_stop else self.samples
        out = self.burst + self.end
        for i in range(len(self.states)):
            out = out + self.state_total(i, n)
        return out

    def units_at(self, event: BurstEvent) -> int:
        """Planned units of this setting done once `event`'s piece is done."""
        if event.phase == "start":
            return self.start.units
        if event.phase == "step":
            return self.start.units + self.step.units * event.step
        if event.phase == "end":
            return self.total.units
        done = self.burst.units + sum(self.state_total(i).units for i in range(event.state))
        done += self.setups[event.state].units
        if event.part == "setup":
            return done
        if event.part == "optimizer":
            return done + self._optimizer_units(event.sample)
        done += self._optimizer_units(self.samples)
        if event.part == "uniform":
            return done + self.uniform_sample.units * event.sample
        done += self.uniform_sample.units * self.samples
        return done + self.layer_sample.units * (self.samples * event.layer + event.sample)

    def cost_of(self, event: BurstEvent) -> int:
        """Planned units of the piece `event` reports (what it cost, in units)."""
        if event.phase == "start":
            return self.start.units
        if event.phase == "step":
            return self.step.units
        if event.phase == "end":
            return self.end.units
        if event.part == "setup":
            return self.setups[event.state].units
        if event.part == "optimizer":
            return (self.optimizer_first if event.sample == 1 else self.optimizer_sample).units
        if event.part == "uniform":
            return self.uniform_sample.units
        return self.layer_sample.units

    def _optimizer_units(self, n: int) -> int:
        return self.optimizer_first.units + self.optimizer_sample.units * (n - 1) if n else 0


@dataclass(frozen=True)
class SweepEstimate:
    """The whole sweep's planned work, and the memory its tensors take."""

    settings: tuple[SettingEstimate, ...]
    params: int  # float parameters of the model
    weight_bytes: int
    gradient_bytes: int  # dL/dW of every weight (psi needs all of them)
    trainable_bytes: int  # the largest setting's phi plus its optimizer states, in float32
    sizes: BatchSizes
    memory: MemoryEstimate | None = None  # what each device holds for the largest setting (hallway_audit.memory)

    @property
    def total(self) -> Passes:
        out = NOTHING
        for s in self.settings:
            out = out + s.total
        return out

    @property
    def least(self) -> Passes:
        out = NOTHING
        for s in self.settings:
            out = out + s.least
        return out

    @property
    def fixed(self) -> Passes:
        out = NOTHING
        for s in self.settings:
            out = out + s.fixed
        return out

    def units_before(self, index: int) -> int:
        """Planned units of the settings before position `index`."""
        return sum(s.total.units for s in self.settings[:index])

    def units_at(self, event: BurstEvent) -> int:
        """Planned units of the whole sweep done once `event`'s piece is done."""
        return self.units_before(event.index) + self.settings[event.index].units_at(event)

    def seconds(self, seconds_per_unit: float) -> float:
        """Wall time of the planned work at a measured speed."""
        return self.total.units * seconds_per_unit


def _trainable(setting: Setting, params: Sequence[ParamInfo]) -> tuple[int, int]:
    """(numbers in phi, layers p_t samples one by one) for a setting, as Realization builds it."""
    sub = setting.subspace
    if sub.kind == "lora":
        targets = select_targets(list(params), sub.targets)
        n = 0
        for p in targets:
            out_f, in_f = p.shape
            n += min(sub.rank_for(p.layer), out_f, in_f) * (out_f + in_f)
        return n, len({p.layer for p in targets})
    numel = sum(_numel(p.shape) for p in params)
    return numel, len({p.layer for p in params})


def _rounds_trained_weights(setting: Setting, params: Sequence[ParamInfo]) -> bool:
    """Are trained weights (not LoRA adapters over a frozen base) stored on a coarser lattice
    than their fp32 master copy? Then the burst also evaluates the master weights."""
    p, sub = setting.precision, setting.subspace
    if p.master_weights != "fp32" or get_format(p.weights).name == "fp32":
        return False
    if sub.kind == "lora":
        return sub.base == "merged"
    return p.applies_to_all() or any(q.matrix_weight for q in params)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate_setting(setting: Setting, params: Sequence[ParamInfo], options: BurstOptions, sizes: BatchSizes) -> SettingEstimate:
    """One setting's passes, piece by piece (see the module docstring for what is assumed)."""
    has_val = sizes.val > 0
    val_loss = forward(sizes.eval_val) if has_val else NOTHING
    losses = forward(sizes.eval) + val_loss  # realized train and held-out loss on the fixed batches
    split = forward_backward(sizes.train)  # the training split's gradient
    micro = forward_backward(sizes.micro)
    states = tuple(pt_states(options.steps, options.p_every))
    val_grad = forward_backward(sizes.eval_val) if has_val else NOTHING  # psi_val
    # state 0 reuses the burst's starting losses and split gradient
    setups = tuple((NOTHING if t == 0 else losses + split) + val_grad for t in states)
    shares = setting.subspace.kind == "lora"
    trial = forward(sizes.eval) + val_loss  # a move judged on the evaluation and held-out batches
    phi, layers = _trainable(setting, params)
    # the loss at the unrounded master weights, at the start and the end of the burst
    shadow = forward(sizes.eval) if _rounds_trained_weights(setting, params) else NOTHING
    opt = setting.optimizer
    kept = 2 * phi if opt.kind == "adamw" else (phi if opt.momentum else 0)
    return SettingEstimate(
        setting=setting.id,
        steps=options.steps,
        states=states,
        samples=options.samples,
        early_stop=options.early_stop,
        layers=layers if options.per_layer_p else 0,
        shares=shares,
        trainable=phi,
        optimizer_state=kept,
        start=losses + split + shadow,
        end=shadow,
        step=micro + losses,
        setups=setups,
        optimizer_first=micro + trial,
        optimizer_sample=trial if shares else micro + trial,
        uniform_sample=forward(sizes.eval),
        layer_sample=forward(sizes.eval) if shares else micro + forward(sizes.eval),
    )


def estimate_sweep(
    settings: Sequence[Setting],
    params: Sequence[ParamInfo],
    options: BurstOptions,
    *,
    train_examples: int,
    val_examples: int,
    weight_bytes: int | None = None,
    memory: MemoryEstimate | None = None,
) -> SweepEstimate:
    """The planned passes of every setting of a sweep, and its memory for weights,
    gradients and the optimizer. `params` is parameter_universe(module);
    `weight_bytes` defaults to float32 weights; `memory` is the per-device model
    (hallway_audit.memory.sweep_memory), carried to the plan line and the report."""
    sizes = BatchSizes.of(train_examples, val_examples, options)
    per_setting = tuple(estimate_setting(s, params, options, sizes) for s in settings)
    n = sum(_numel(p.shape) for p in params)
    wbytes = weight_bytes if weight_bytes is not None else n * FLOAT32
    largest = max(((s.trainable + s.optimizer_state) for s in per_setting), default=0)
    return SweepEstimate(
        settings=per_setting,
        params=n,
        weight_bytes=wbytes,
        gradient_bytes=wbytes,
        trainable_bytes=largest * FLOAT32,
        sizes=sizes,
        memory=memory,
    )
