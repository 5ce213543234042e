"""What a sweep tells its caller while it runs: its estimate once, then each piece of work done.

The library never prints: a caller (the CLI's progress display, a notebook, a CI log)
passes one callback and decides what to show. Events say *where* the sweep is; the
SweepEstimate sent first says how much work lies where (SettingEstimate.units_at),
so a display can turn positions into a bar and an ETA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:
    from .estimate import SweepEstimate

Phase = Literal["start", "step", "p_t", "end"]
Part = Literal["", "setup", "optimizer", "uniform", "layer"]


@dataclass(frozen=True)
class BurstEvent:
    """A piece of one setting's work that has just finished.

    phase "start": the starting losses and the training split's gradient;
    "step": optimizer step `step` of `steps` (1-based);
    "p_t": at measured state `state` (0-based, of `states`), part "setup" (its losses
    and gradients), or sample `sample` of `samples` of the "optimizer" or "uniform"
    proposal, or of layer `layer` (0-based, of `layers`) with --per-layer-p; "end": the
    last loss at the final state. A part that stops early (its interval excludes 1/2)
    simply has no events for the rest.
    """

    setting: str
    phase: Phase
    steps: int
    index: int = 0  # the setting's position in the sweep (0-based), set by run_sweep
    settings: int = 1
    step: int = 0
    state: int = 0
    states: int = 0
    part: Part = ""
    sample: int = 0
    samples: int = 0
    layer: int = 0
    layers: int = 0

    @property
    def is_sample(self) -> bool:
        """A p_t sample: the pieces early stopping may skip (the others always run)."""
        return self.part in ("optimizer", "uniform", "layer")

    def describe(self) -> str:
        """One line for a display: 'setting 2/4 bf16/r16/adamw-0.0001: p_t state 1/2, optimizer sample 23/64'."""
        head = f"setting {self.index + 1}/{self.settings} {self.setting}: "
        if self.phase == "start":
            return head + "starting losses and gradient"
        if self.phase == "step":
            return head + f"burst step {self.step}/{self.steps}"
        if self.phase == "end":
            return head + "final losses"
        where = f"p_t state {self.state + 1}/{self.states}"
        if self.part == "setup":
            return head + f"{where}, losses and gradients"
        what = f"layer {self.layer + 1}/{self.layers} sample" if self.part == "layer" else f"{self.part} sample"
        return head + f"{where}, {what} {self.sample}/{self.samples}"


# progress(event): a SweepEstimate once before the first burst, then a BurstEvent after
# every piece of work (a step, a p_t state's setup, a p_t sample).
ProgressEvent = Union["SweepEstimate", BurstEvent]
BurstProgress = Callable[[ProgressEvent], None]
