"""The run's progress on stderr: one transient display, and a few plain lines.

One rich Progress shows the static pass (bytes read) and then the dynamic audit as a
single bar over the sweep's planned work units, with a total ETA and a line naming
the current piece ("setting 2/4 bf16/r16/adamw-0.0001: p_t state 1/2, optimizer
sample 23/64"). It is drawn only when stderr is a terminal and vanishes at the end.

Plain lines (also in CI logs, where there is no bar) state the dynamic plan and its
cost before the first pass, the wall time estimated once its first steps and p_t
samples are timed, and, for runs over LONG_RUN_S, the time taken. --quiet silences all of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.text import Text

from ..memory import memory_lines
from ..probe.estimate import SweepEstimate
from ..probe.events import BurstEvent, BurstProgress, ProgressEvent
from ..static.audit import Progress as StaticProgress

LONG_RUN_S = 10.0  # runs longer than this end with "audit took N (estimated M)"
PREFIX = "hallway-audit: "


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 05 min': what a person reads at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def size(n: float) -> str:
    """Decimal units, as file managers and rich's download column show them."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def count(n: float) -> str:
    """1234567 -> '1.2M', 96600 -> '96.6k': parameter and pass counts."""
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.1f}{unit}"
    return f"{n:.0f}"


def plan_lines(estimate: SweepEstimate, checkpoint_bytes: int | None) -> list[str]:
    """What the dynamic audit will run and cost, before it runs (two lines)."""
    first = estimate.settings[0] if estimate.settings else None
    sizes = estimate.sizes
    if first is None:
        return []
    k = first.samples
    samples = f"{k} optimizer + {k} uniform" + (f" + {first.layers} layers x {k}" if first.layers else "")
    ckpt = f"checkpoint {size(checkpoint_bytes)}, " if checkpoint_bytes is not None else ""
    total = estimate.total
    n = len(estimate.settings)
    cost = (f"cost: at most {total.forwards:,} forwards and {total.backwards:,} backwards "
            f"({total.units:,} example-passes, a backward counted as 2)")
    if estimate.memory is None:  # a caller's estimate without the per-device model
        cost += (f"; memory: weights {size(estimate.weight_bytes)} + gradients {size(estimate.gradient_bytes)}"
                 f" + trained and optimizer state up to {size(estimate.trainable_bytes)}, plus activations")
    else:
        cost += "; " + "; ".join(memory_lines(estimate.memory))
    return [
        f"plan: {n} setting{'s' if n != 1 else ''} x ({first.steps} steps + p_t at {len(first.states)} states "
        f"x up to {samples} samples) on {count(estimate.params)} parameters ({ckpt}"
        f"{sizes.train} training / {sizes.val} held-out examples)",
        cost,
    ]


class _Bars(Progress):
    """A Progress with one line of text under its bars: the piece of work now running."""

    phase = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.phase:
            yield Text(self.phase, style="dim", no_wrap=True, overflow="ellipsis")


class RunDisplay:
    """Receives the static pass's and the sweep's callbacks; draws and prints."""

    def __init__(self, console: Console, *, bars: bool, clock: Callable[[], float] = time.perf_counter) -> None:
        self.console = console
        self.clock = clock
        self.started = clock()
        self.bars: _Bars | None = None
        if bars:
            self.bars = _Bars(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=40),
                TextColumn("{task.fields[amount]}"),
                TextColumn("{task.fields[eta]}", style="cyan"),
                console=console,
                transient=True,
                refresh_per_second=4,
                expand=False,
            )
        # before the first callback: the model, data and loss are checked (a pulsing bar)
        self.starting_task = self.bars.add_task("starting", total=None, amount="", eta="") if self.bars else None
        self.static_task: TaskID | None = None
        self.static_started = 0.0
        self.checkpoint_bytes: int | None = None
        self.estimate: SweepEstimate | None = None
        self.dynamic_task: TaskID | None = None
        self.dynamic_started = 0.0
        self.dynamic_ended: float | None = None  # when the latest piece finished
        self.position = 0  # where the sweep is, in planned units (samples skipped by early stopping included)
        # seconds, units and pieces run so far, for the pieces that always run and for p_t samples:
        # their cost per unit differs several-fold (a step's bookkeeping against a bare forward)
        self.spent = {"fixed": [0.0, 0, 0], "samples": [0.0, 0, 0]}
        self.estimated_seconds: float | None = None  # every sample drawn
        self.estimated_least: float | None = None  # every p_t proposal stopped at its first check

    # -- lines ------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """A plain line on stderr, above the bars when they are drawn."""
        self.console.print(PREFIX + line, markup=False, highlight=False, emoji=False, soft_wrap=True)

    # -- the static pass ----------------------------------------------------------------

    def static(self, done: int, total: int, name: str) -> None:
        self.checkpoint_bytes = total
        if self.bars is None:
            return
        now = self.clock()
        if self.static_task is None:
            if self.starting_task is not None:
                self.bars.update(self.starting_task, visible=False)
            self.static_started = now
            self.static_task = self.bars.add_task("static pass", total=max(total, 1), amount=f"0 B/{size(total)}",
                                                  eta="")
        elapsed = now - self.static_started
        eta = f"{duration(elapsed / done * (total - done))} left" if done and elapsed > 1 else ""
        finished = done >= total
        self.bars.update(self.static_task, completed=done, amount=f"{size(done)}/{size(total)}", eta=eta,
                         visible=not finished)
        self.bars.phase = "" if finished else f"static pass: {name}"
        if finished:
            self.bars.refresh()

    # -- the dynamic audit --------------------------------------------------------------

    def dynamic(self, event: ProgressEvent) -> None:
        if isinstance(event, SweepEstimate):
            self._plan(event)
        else:
            self._piece(event)

    def _plan(self, estimate: SweepEstimate) -> None:
        self.estimate = estimate
        if self.bars is not None:
            if self.static_task is not None:
                self.bars.update(self.static_task, visible=False)
            self.dynamic_task = self.bars.add_task("dynamic audit", total=max(estimate.total.units, 1),
                                                   amount="0%", eta="")
            first = estimate.settings[0].setting if estimate.settings else ""
            self.bars.phase = f"setting 1/{len(estimate.settings)} {first}: starting losses and gradient"
            self.bars.refresh()  # lines printed now must not bring back the static bar's last frame
        for line in plan_lines(estimate, self.checkpoint_bytes):
            self.say(line)
        self.dynamic_started = self.clock()

    def _piece(self, event: BurstEvent) -> None:
        estimate = self.estimate
        if estimate is None or event.index >= len(estimate.settings):
            return  # events without a plan (a caller of run_burst alone): nothing to scale by
        now = self.clock()
        spent = self.spent["samples" if event.is_sample else "fixed"]
        spent[0] += now - (self.dynamic_ended if self.dynamic_ended is not None else self.dynamic_started)
        spent[1] += estimate.settings[event.index].cost_of(event)
        spent[2] += 1
        self.dynamic_ended = now
        self.position = estimate.units_at(event)
        left = self.seconds_left()
        if self.estimated_seconds is None and left is not None and self._timed_enough(event):
            elapsed = now - self.dynamic_started
            self.estimated_seconds = elapsed + left
            self.estimated_least = elapsed + (self.seconds_left(least=True) or 0.0)
            self.say(f"estimate: {self.estimated_range()} for the dynamic audit (timed on its first steps "
                     "and samples; the longer when no p_t proposal stops early)")
        if self.bars is not None and self.dynamic_task is not None:
            total = estimate.total.units
            self.bars.update(self.dynamic_task, completed=self.position,
                             amount=f"{100 * self.position / max(total, 1):.0f}%",
                             eta=f"{duration(left)} left" if left is not None else "")
            self.bars.phase = event.describe()

    def _timed_enough(self, event: BurstEvent) -> bool:
        """Both kinds of piece timed a few times (or the first setting done): a stable speed."""
        return (self.spent["fixed"][2] >= 2 and self.spent["samples"][2] >= 8) or event.index > 0

    def estimated_range(self) -> str:
        """'about 4 min 10 s to 9 min 20 s', or 'about 9 min 20 s' when both ends agree."""
        high = duration(self.estimated_seconds or 0.0)
        low = duration(self.estimated_least if self.estimated_least is not None else self.estimated_seconds or 0.0)
        return f"about {high}" if low == high else f"about {low} to {high}"

    def seconds_left(self, least: bool = False) -> float | None:
        """The planned work not yet done at the speed measured so far, per kind of piece; with
        `least`, as if every p_t proposal stops at its first early-stopping check."""
        estimate = self.estimate
        if estimate is None:
            return None
        fixed_s, fixed_u, _ = self.spent["fixed"]
        samples_s, samples_u, _ = self.spent["samples"]
        fixed_rate = fixed_s / fixed_u if fixed_u else None
        samples_rate = samples_s / samples_u if samples_u else None
        if fixed_rate is None and samples_rate is None:
            return None
        fixed_left = max(estimate.fixed.units - fixed_u, 0)
        if least:
            samples_left = max(estimate.least.units - estimate.fixed.units - samples_u, 0)
        else:
            samples_left = max(estimate.total.units - self.position - fixed_left, 0)
        return (fixed_left * (fixed_rate if fixed_rate is not None else samples_rate or 0.0)
                + samples_left * (samples_rate if samples_rate is not None else fixed_rate or 0.0))

    # -- the end ------------------------------------------------------------------------

    def summary(self) -> str | None:
        """'audit took 1 min 33 s (dynamic audit 1 min 25 s, estimated about 50 s to 1 min 40 s)', or
        None for short runs. Timed from the start of the audit (Python's imports come before it)."""
        took = self.clock() - self.started
        if took <= LONG_RUN_S:
            return None
        line = f"audit took {duration(took)}"
        if self.estimate is not None:
            end = self.dynamic_ended if self.dynamic_ended is not None else self.clock()
            line += f" (dynamic audit {duration(end - self.dynamic_started)}"
            if self.estimated_seconds is not None:
                line += f", estimated {self.estimated_range()}"
            line += ")"
        return line


@contextmanager
def run_progress(
    *, quiet: bool, console: Console | None = None, clock: Callable[[], float] = time.perf_counter,
) -> Iterator[tuple[StaticProgress | None, BurstProgress | None]]:
    """(static callback, sweep callback) for audit(); bars only on a terminal, nothing with quiet.

    On a normal exit, a run longer than LONG_RUN_S ends with one line: its time, and the
    estimate it was given."""
    if quiet:
        yield None, None
        return
    console = console or Console(stderr=True)
    display = RunDisplay(console, bars=console.is_terminal, clock=clock)
    if display.bars is None:
        yield display.static, display.dynamic
    else:
        with display.bars:
            yield display.static, display.dynamic
    line = display.summary()
    if line is not None:
        display.say(line)
