"""The library's burst against bench/reference.py, the straightforward implementation.

The reference transcribes the definitions directly (explicit n x n projectors, an SVD
per gradient matrix, every weight re-quantized for every forward, a forward and
backward per p_t sample), so agreement checks the fast paths: per-example shares,
Gram-matrix psi_star, r-column tangent projections, cached frozen weights.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama_model

from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import (
    BurstOptions,
    OptimizerSpec,
    PrecisionStack,
    Setting,
    Subspace,
    run_sweep,
)
from hallway_audit.probe.stats import wilson_interval

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _reference_module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_reference", BENCH / "reference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("weights", ["bf16", "fp8_e4m3"])
def test_library_burst_agrees_with_the_straightforward_implementation(weights):
    reference = _reference_module()
    model = tiny_llama_model()
    ids = torch.randint(0, 64, (20, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    train = {k: v[:14] for k, v in batch.items()}
    val = {k: v[14:] for k, v in batch.items()}
    # The reference re-quantizes every parameter, adapters merged: the library's
    # scope="all", base="merged" mode (the frozen-base default is tested in test_peft_semantics.py).
    setting = Setting(PrecisionStack(weights, None, "nearest", "fp32", scope="all"),
                      Subspace("lora", 4, "all-linear", base="merged"), OptimizerSpec("adamw", 1e-3))
    options = BurstOptions(steps=3, samples=24, micro_batch=4, eval_batch=8, early_stop=False)

    ref = reference.Reference(model, causal_lm, setting, train, val, options).run(setting)
    lib = run_sweep(model, settings=[setting], loss_fn=causal_lm, loss_name="t", train=train, val=val, options=options,
                    model_source="t", calib="t", val_source="t").settings[0]

    assert [s.loss for s in lib.steps] == ref["loss"]  # same weights, same forward: bit-identical
    assert [s.beta for s in lib.steps] == ref["beta"]
    for mine, theirs in zip([s.psi for s in lib.steps], ref["psi"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    r_star = {name.removesuffix(".weight"): r for name, r in ref["r_star"].items()}
    assert {layer: d.r_star for layer, d in lib.layers.items() if d.r_star is not None} == r_star
    assert [p.g_b for p in lib.pt] == ["example shares", "example shares"]
    # p_t: the same proposal distribution, different random draws of the noise
    for state, counts in zip(lib.pt, ref["pt"], strict=True):
        for rate, key in ((state.optimizer, "optimizer"), (state.uniform, "uniform"), (state.val, "val")):
            lo, hi = wilson_interval(counts[key], options.samples)
            my_lo, my_hi = rate.interval
            assert rate.n == options.samples
            assert my_lo <= hi and lo <= my_hi, (key, rate.successes, counts[key])
