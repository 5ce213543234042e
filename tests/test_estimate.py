"""The sweep's cost estimate against real sweeps on a tiny Llama: every forward the model
runs is counted by a hook and must equal the planned count when every sample is drawn
(no early stopping); with early stopping the plan is an upper bound. The progress
events must walk the plan's units from 0 to its total."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model

from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import BurstOptions, OptimizerSpec, PrecisionStack, Setting, Subspace, run_sweep
from hallway_audit.probe.estimate import BatchSizes, Passes, estimate_sweep, pt_states
from hallway_audit.probe.events import BurstEvent
from hallway_audit.probe.realize import Realization
from hallway_audit.probe.targets import param_dict, parameter_universe


def setting(weights="fp32", kind="lora", rank=2, sparsity=0.0, opt="adamw", master="fp32", base="frozen") -> Setting:
    return Setting(PrecisionStack(weights, master_weights=master), Subspace(kind, rank, sparsity=sparsity, base=base),
                   OptimizerSpec(opt, 1e-3))


# bf16 full and merged LoRA with fp32 master weights also evaluate the loss at the master weights
SETTINGS = {
    "lora": [setting("bf16", "lora", 2)],
    "lora-merged-fp8": [setting("fp8_e4m3", "lora", 2, base="merged")],
    "full": [setting("fp32", "full", 0)],
    "full-bf16-no-master": [setting("bf16", "full", 0, master="none")],
    "sparse-sgd": [setting("fp32", "sparse", 0, sparsity=0.5, opt="sgd")],
    "mixed": [setting("bf16", "lora", 4), setting("bf16", "full", 0)],
}


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (14, 9), generator=g)
    train = {"input_ids": ids[:10], "attention_mask": torch.ones_like(ids[:10]), "labels": ids[:10].clone()}
    val = {"input_ids": ids[10:], "attention_mask": torch.ones_like(ids[10:]), "labels": ids[10:].clone()}
    return model, train, val


class ForwardCounter:
    """Counts the model's forward calls (every pass of the sweep goes through the module)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1


def run(model, train, val, settings, **options):
    opts = BurstOptions(**{"steps": 3, "samples": 5, "micro_batch": 4, "eval_batch": 6, **options})
    events: list = []
    counter = ForwardCounter(model)
    try:
        result = run_sweep(model, settings=settings, loss_fn=causal_lm, loss_name="causal_lm", train=train, val=val,
                           options=opts, model_source="test", calib="test", val_source="test",
                           progress=events.append)
    finally:
        counter.handle.remove()
    return result, events, counter.calls


# per-layer p_t samples every layer of a full setting (22 here): few samples keep it quick
PER_LAYER = {"p_every": 2, "per_layer_p": True, "samples": 2}
CASES = [(name, {}) for name in sorted(SETTINGS)] + [("lora", PER_LAYER), ("sparse-sgd", PER_LAYER)]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{'per_layer' if o else 'default'}" for n, o in CASES])
def test_planned_passes_equal_a_real_sweep_without_early_stop(llama, name, options):
    model, train, val = llama
    result, events, forwards = run(model, train, val, SETTINGS[name], early_stop=False, **options)
    estimate = events[0]
    assert estimate is result.estimate
    assert estimate.least == estimate.total  # without early stopping every sample is drawn
    assert any(p.end.forwards for p in estimate.settings) == (name in ("mixed", "lora-merged-fp8"))
    planned = estimate.total
    assert forwards == planned.forwards == sum(r.forwards for r in result.settings)
    assert planned.backwards == sum(r.backwards for r in result.settings)
    for plan, real in zip(estimate.settings, result.settings, strict=True):
        assert plan.setting == real.id
        assert (plan.total.forwards, plan.total.backwards) == (real.forwards, real.backwards)
    # no sample skipped: the events' pieces add up to the plan, and positions end at its total
    pieces = [e for e in events[1:] if isinstance(e, BurstEvent)]
    assert len(pieces) == len(events) - 1
    assert sum(estimate.settings[e.index].cost_of(e) for e in pieces) == planned.units
    positions = [estimate.units_at(e) for e in pieces]
    assert positions == sorted(positions) and positions[-1] == planned.units
    assert all(estimate.units_at(e) - estimate.settings[e.index].cost_of(e) == before
               for e, before in zip(pieces, [0, *positions[:-1]], strict=True))


def test_without_a_held_out_batch_the_plan_still_matches(llama):
    model, train, _ = llama
    result, events, forwards = run(model, train, None, SETTINGS["mixed"], early_stop=False)
    assert events[0].sizes.val == 0
    assert forwards == events[0].total.forwards
    assert events[0].total.backwards == sum(r.backwards for r in result.settings)


def test_early_stopping_only_lowers_the_counts(llama):
    model, train, val = llama
    # 32 samples: an interval can exclude 1/2 from 16 samples on
    result, events, forwards = run(model, train, val, SETTINGS["mixed"], samples=32, steps=2)
    estimate = events[0]
    assert forwards == sum(r.forwards for r in result.settings) <= estimate.total.forwards
    assert sum(r.backwards for r in result.settings) <= estimate.total.backwards
    drawn = [s.optimizer.n + s.uniform.n for r in result.settings for s in r.pt]
    assert min(drawn) < 64, "no proposal stopped early: the test shows nothing"
    assert forwards < estimate.total.forwards
    # no move was blocked here, so no proposal ran fewer than its first check's 16 samples' forwards
    assert all(s.blocked == s.blocked_uniform == 0 for r in result.settings for s in r.pt)
    assert estimate.least.forwards <= forwards
    # the bar still ends at the plan's total: positions skip what early stopping left out
    pieces = [e for e in events[1:] if isinstance(e, BurstEvent)]
    assert estimate.units_at(pieces[-1]) <= estimate.total.units
    assert sum(estimate.settings[e.index].cost_of(e) for e in pieces) < estimate.total.units


def test_trainable_numbers_match_the_realization(llama):
    model = llama[0]
    params = parameter_universe(model)
    base = param_dict(model)
    settings = [setting("bf16", "lora", 4), setting("fp32", "full", 0), setting("fp32", "sparse", 0, sparsity=0.5, opt="sgd")]
    estimate = estimate_sweep(settings, params, BurstOptions(), train_examples=10, val_examples=4)
    for s, plan in zip(settings, estimate.settings, strict=True):
        real = Realization(s, params, base, torch.Generator().manual_seed(0))
        assert plan.trainable == sum(v.numel() for v in real.phi.values())
    lora, full, sparse_sgd = estimate.settings
    assert lora.optimizer_state == 2 * lora.trainable  # AdamW: two moments
    assert sparse_sgd.optimizer_state == 0  # SGD without momentum keeps nothing
    assert full.trainable == estimate.params == sum(p.numel() for p in model.parameters())
    assert estimate.weight_bytes == estimate.gradient_bytes == 4 * estimate.params
    assert estimate.trainable_bytes == 4 * (full.trainable + full.optimizer_state)


def test_units_follow_the_batch_sizes():
    sizes = BatchSizes.of(train=30, val=5, options=BurstOptions(eval_batch=16, micro_batch=8))
    assert sizes == BatchSizes(train=30, val=5, eval=16, eval_val=5, micro=8)
    # a backward counts twice: a micro-batch step's gradient is 3 x 8 units
    assert Passes(1, 1, 24) + Passes(1, 0, 16) == Passes(2, 1, 40)
    assert 3 * Passes(1, 0, 16) == Passes(3, 0, 48)


@pytest.mark.parametrize(("steps", "p_every", "states"), [(8, 0, [0, 8]), (8, 3, [0, 3, 6, 8]), (1, 1, [0, 1]), (4, 2, [0, 2, 4])])
def test_pt_states(steps, p_every, states):
    assert pt_states(steps, p_every) == states
