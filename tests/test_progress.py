"""The run's progress display and plan lines: driven by the event sequence a sweep emits
(on a fake clock, so times are exact) in a terminal-like rich Console, and by real tiny
runs through the library and the CLI."""

from __future__ import annotations

import io
import json
import re
from functools import partial

import pytest
from helpers import EXAMPLE
from rich.console import Console

from hallway_audit import BurstOptions, DynamicPlan, SweepSpec, audit
from hallway_audit.cli import main
from hallway_audit.cli.progress import RunDisplay, count, duration, plan_lines, run_progress, size
from hallway_audit.probe import OptimizerSpec, PrecisionStack, Setting, Subspace
from hallway_audit.probe.estimate import SweepEstimate, estimate_sweep
from hallway_audit.probe.events import BurstEvent
from hallway_audit.probe.targets import ParamInfo

CALIB = EXAMPLE / "calib.safetensors"
FIXED_S, SAMPLE_S = 1e-3, 2.5e-4  # seconds per unit on the fake clock: a step's unit costs 4 samples'


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120, record=True)


def lines_of(console: Console) -> list[str]:
    """The plain lines printed: each ends its line (a redrawn frame may precede it on the record)."""
    return re.findall(r"hallway-audit: [^\n]*", console.export_text(clear=False))


def visible(display: RunDisplay) -> list[str]:
    assert display.bars is not None
    return [t.description for t in display.bars.tasks if t.visible]


def small_estimate(samples: int = 64, per_layer_p: bool = False) -> SweepEstimate:
    params = [ParamInfo("a.weight", "a", (32, 16), True), ParamInfo("a.bias", "a", (32,), False),
              ParamInfo("b.weight", "b", (8, 32), True)]
    settings = [Setting(PrecisionStack("bf16"), Subspace("lora", 4), OptimizerSpec()),
                Setting(PrecisionStack("bf16"), Subspace("full"), OptimizerSpec())]
    return estimate_sweep(settings, params, BurstOptions(steps=8, samples=samples, per_layer_p=per_layer_p),
                          train_examples=24, val_examples=8)


def sweep_events(estimate: SweepEstimate, drawn: int | None = None):
    """The events a sweep emits for this plan; `drawn` samples per proposal (early stopping)."""
    n = len(estimate.settings)
    for i, s in enumerate(estimate.settings):
        event = partial(BurstEvent, s.setting, index=i, settings=n, steps=s.steps)
        yield event(phase="start")
        for t in range(1, s.steps + 1):
            yield event(phase="step", step=t)
        for k in range(len(s.states)):
            at = partial(event, phase="p_t", state=k, states=len(s.states))
            yield at(part="setup")
            for part in ("optimizer", "uniform"):
                for j in range(1, (drawn or s.samples) + 1):
                    yield at(part=part, sample=j, samples=s.samples)
        yield event(phase="end")


def drive(display: RunDisplay, clock: Clock, estimate: SweepEstimate, drawn: int | None = None) -> float:
    """Feed a sweep's events, each after its planned units' time; returns the time it took."""
    display.dynamic(estimate)
    start = clock.now
    for e in sweep_events(estimate, drawn):
        clock.now += estimate.settings[e.index].cost_of(e) * (SAMPLE_S if e.is_sample else FIXED_S)
        display.dynamic(e)
    return clock.now - start


def test_event_lines_name_the_setting_the_state_and_the_sample():
    e = BurstEvent("bf16/r16/adamw-0.0001", "p_t", 8, index=1, settings=4, state=0, states=2, part="optimizer",
                   sample=23, samples=64)
    assert e.describe() == "setting 2/4 bf16/r16/adamw-0.0001: p_t state 1/2, optimizer sample 23/64"
    assert BurstEvent("x", "step", 8, step=3).describe() == "setting 1/1 x: burst step 3/8"
    layer = BurstEvent("x", "p_t", 8, state=1, states=2, part="layer", sample=5, samples=64, layer=2, layers=7)
    assert layer.describe() == "setting 1/1 x: p_t state 2/2, layer 3/7 sample 5/64"
    assert layer.is_sample and not BurstEvent("x", "p_t", 8, part="setup").is_sample


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (42.4, "42 s"), (185, "3 min 05 s"), (7500, "2 h 05 min")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_sizes_and_counts():
    assert (size(386_304), size(90_900_000), size(12), size(13.5e9)) == ("386.3 kB", "90.9 MB", "12 B", "13.5 GB")
    assert (count(96_600), count(1_234_567), count(7)) == ("96.6k", "1.2M", "7")


def test_plan_lines_state_settings_samples_passes_and_memory():
    estimate = small_estimate()
    total = estimate.total
    plan, cost = plan_lines(estimate, checkpoint_bytes=90_900_000)
    assert plan == ("plan: 2 settings x (8 steps + p_t at 2 states x up to 64 optimizer + 64 uniform samples) on 800 parameters "
                    "(checkpoint 90.9 MB, 24 training / 8 held-out examples)")
    assert cost.startswith(f"cost: at most {total.forwards:,} forwards and {total.backwards:,} backwards "
                           f"({total.units:,} example-passes")
    assert f"weights {size(4 * 800)}" in cost and f"up to {size(estimate.trainable_bytes)}" in cost
    # with --per-layer-p each LoRA target layer (a and b) draws its own samples
    plan = plan_lines(small_estimate(per_layer_p=True), None)[0]
    assert "x up to 64 optimizer + 64 uniform + 2 layers x 64 samples) on 800 parameters (24 training" in plan


def test_one_display_walks_static_then_dynamic_and_estimates_exactly_on_a_steady_clock():
    console, clock = terminal(), Clock()
    display = RunDisplay(console, bars=True, clock=clock)
    estimate = small_estimate()
    assert display.bars is not None
    with display.bars:
        assert visible(display) == ["starting"]  # while the model and data are checked
        display.static(0, 2000, "a.weight")
        clock.now += 2.0
        display.static(1000, 2000, "b.weight")
        assert visible(display) == ["static pass"]
        static = display.bars.tasks[1]
        assert static.visible and static.fields["amount"] == "1.0 kB/2.0 kB" and static.fields["eta"] == "2 s left"
        assert display.bars.phase == "static pass: b.weight"
        clock.now += 2.0
        display.static(2000, 2000, "")
        assert not static.visible  # the static bar does not linger at 100%

        took = drive(display, clock, estimate)
        dynamic = display.bars.tasks[2]
        assert visible(display) == ["dynamic audit"]
        assert dynamic.total == dynamic.completed == estimate.total.units
        assert dynamic.fields["amount"] == "100%" and dynamic.fields["eta"] == "0 s left"
        assert display.bars.phase == f"setting 2/2 {estimate.settings[1].setting}: final losses"
        # timed per kind of piece, the estimate is the run's true time on a steady clock
        assert display.estimated_seconds == pytest.approx(took)
        assert display.estimated_least < took
    plan, cost, estimate_line = lines_of(console)
    assert plan.startswith("hallway-audit: plan: 2 settings") and "checkpoint 2.0 kB" in plan
    assert cost.startswith("hallway-audit: cost: at most")
    assert estimate_line == (f"hallway-audit: estimate: about {duration(display.estimated_least)} to {duration(took)} "
                             "for the dynamic audit (timed on its first steps and samples; the longer when no p_t "
                             "proposal stops early)")


def test_the_eta_counts_down_and_skips_what_early_stopping_leaves_out():
    console, clock = terminal(), Clock()
    display = RunDisplay(console, bars=True, clock=clock)
    estimate = small_estimate()
    assert display.bars is not None
    with display.bars:
        display.dynamic(estimate)
        lefts, positions = [], []
        for e in sweep_events(estimate, drawn=16):
            clock.now += estimate.settings[e.index].cost_of(e) * (SAMPLE_S if e.is_sample else FIXED_S)
            display.dynamic(e)
            positions.append(display.position)
            if display.spent["samples"][2] >= 8:
                lefts.append(display.seconds_left())
        assert positions == sorted(positions) and positions[-1] == estimate.total.units
        assert lefts == sorted(lefts, reverse=True) and lefts[-1] == 0
        # every proposal stopped at its first check (16 of 64): the short end of the estimate
        assert display.estimated_least == pytest.approx(clock.now)
        assert clock.now < display.estimated_seconds


def test_without_a_terminal_only_lines_and_nothing_with_quiet():
    console, clock = Console(file=io.StringIO(), width=80), Clock()
    with run_progress(quiet=False, console=console, clock=clock) as (static, dynamic):
        assert static is not None and dynamic is not None
        static(0, 10, "w")
        static(10, 10, "")
        clock.now += 5
        for e in [small_estimate(), *sweep_events(small_estimate())]:
            clock.now += 0.01
            dynamic(e)
    text = console.file.getvalue()
    assert "\x1b[" not in text and "━" not in text  # no bar, no escape codes
    lines = text.splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["plan", "cost", "estimate", "audit"]
    # 536 events 10 ms apart after 5 s of static pass: 10.37 s in all
    assert lines[3].startswith("hallway-audit: audit took 10 s (dynamic audit 5 s, estimated about ")
    quiet = Console(file=io.StringIO())
    with run_progress(quiet=True, console=quiet) as callbacks:
        assert callbacks == (None, None)
    assert quiet.file.getvalue() == ""


def test_short_runs_end_without_a_summary_long_ones_with_the_estimate():
    console, clock = Console(file=io.StringIO(), width=80), Clock()
    display = RunDisplay(console, bars=False, clock=clock)
    clock.now = 9.0
    assert display.summary() is None
    took = drive(display, clock, small_estimate())
    clock.now += 12
    assert display.summary() == (f"audit took {duration(clock.now)} (dynamic audit {duration(took)}, "
                                 f"estimated about {duration(display.estimated_least)} to "
                                 f"{duration(display.estimated_seconds)})")
    static_only = RunDisplay(console, bars=False, clock=clock)
    clock.now += 11
    assert static_only.summary() == "audit took 11 s"


def test_a_real_run_draws_one_display_with_the_plan_above_it():
    console = terminal()
    plan = DynamicPlan(calib=str(CALIB), sweep=SweepSpec(precision=["bf16"], rank=[4]),
                       burst=BurstOptions(steps=2, samples=16))
    with run_progress(quiet=False, console=console) as (static, dynamic):
        result = audit(EXAMPLE, progress=static, burst_progress=dynamic, dynamic=plan)
    text = console.export_text(clear=False)
    assert "static pass" in text and "dynamic audit" in text
    assert "setting 1/1 bf16/r4/adamw-0.0001: p_t state 2/2" in text
    assert re.search(r"dynamic audit [━╸╺ ]+ 100% 0 s left", text)
    lines = lines_of(console)
    assert lines[0].startswith("hallway-audit: plan: 1 setting x (2 steps + p_t at 2 states x up to 16 optimizer + 16 uniform samples)")
    est = result.dynamic.estimate
    assert f"at most {est.total.forwards:,} forwards and {est.total.backwards:,} backwards" in lines[1]
    assert result.dynamic.settings[0].forwards <= est.total.forwards


def test_the_cli_states_its_plan_on_stderr_and_the_plan_is_what_ran(capsys):
    code = main([str(EXAMPLE), "--calib", str(CALIB), "--precision", "bf16", "--rank", "4,8", "--steps", "2",
                 "--samples", "16", "--no-early-stop", "--format", "json"])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    doc = json.loads(out)
    forwards = sum(s["cost"]["forwards"] for s in doc["settings"])
    backwards = sum(s["cost"]["backwards"] for s in doc["settings"])
    lines = err.splitlines()
    assert lines[0].startswith("hallway-audit: plan: 2 settings x (2 steps + p_t at 2 states x up to 16 optimizer + 16 uniform samples)")
    assert "checkpoint 386.3 kB" in lines[0]
    assert lines[1].startswith(f"hallway-audit: cost: at most {forwards:,} forwards and {backwards:,} backwards")
    assert lines[2].startswith("hallway-audit: estimate: about ")  # one figure: every sample is drawn
    assert " to " not in lines[2].split("for the dynamic audit")[0]
    assert "error" not in err.lower()
    capsys.readouterr()
    assert main([str(EXAMPLE), "--calib", str(CALIB), "--precision", "bf16", "--rank", "4", "--steps", "1",
                 "--samples", "16", "-q", "--format", "json"]) in (0, 1)
    assert capsys.readouterr().err == ""
