"""Per-example shares of the LoRA gradient (the p_t proposal's g_b without a backward per sample).

Checked against the direct micro-batch gradient on a tiny Llama at a state where
B != 0 (both A and B shares are nonzero), refused for a loss that does not split by
example, and end to end: a burst with shares gives exactly the p_t counts of one
that computes every g_b directly, with one backward per state instead of one per sample.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model
from torch import nn

from hallway_audit.model.data import MicroBatches, take
from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import (
    BurstOptions,
    OptimizerSpec,
    PrecisionStack,
    Setting,
    Subspace,
    run_sweep,
)
from hallway_audit.probe.engine import LossEvaluator
from hallway_audit.probe.realize import Realization
from hallway_audit.probe.shares import ExampleShares
from hallway_audit.probe.targets import parameter_universe


def _llama():
    model = tiny_llama_model()
    ids = torch.randint(0, 64, (12, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0  # a padded example: token counts differ between examples
    labels = ids.masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora(model: nn.Module, weights: str = "fp32", rank: int = 2) -> Realization:
    params = parameter_universe(model)
    base = {k: v.detach() for k, v in model.named_parameters()}
    s = Setting(PrecisionStack(weights, None, "nearest", "fp32"), Subspace("lora", rank, "all-linear"), OptimizerSpec("adamw", 1e-3))
    real = Realization(s, params, base, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move B off zero so that both shares are nonzero
        for k, v in real.phi.items():
            if k.endswith("::B"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    real._bases.clear()
    return real


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].double().flatten() for k in sorted(d)])


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_shares_of_a_micro_batch_point_where_its_direct_gradient_does(weights):
    model, batch = _llama()
    real = _lora(model, weights)
    evaluator = LossEvaluator(model, causal_lm)
    now = real.realized()
    shares = ExampleShares(model, real, 12)
    assert ExampleShares.supported(model, real)
    with shares.recording():
        evaluator.loss_and_grad(now, batch)
    assert shares.usable
    for index in (torch.tensor([0, 3, 7, 11]), torch.tensor([5]), torch.arange(12)):
        _, g = evaluator.loss_and_grad(now, take(batch, index))
        direct = real.phi_grad(g)
        mine = shares.micro_batch(index)
        a, b = _flat(mine), _flat(direct)
        cos = float(a @ b / (a.norm() * b.norm()))
        assert cos > 1 - 1e-9, index
        assert any(float(mine[k].abs().max()) > 0 for k in mine if k.endswith("::A"))
        assert any(float(mine[k].abs().max()) > 0 for k in mine if k.endswith("::B"))
        assert shares.agrees_with(index, direct)
    # a different micro-batch's gradient is not mistaken for this one's
    _, other = evaluator.loss_and_grad(now, take(batch, torch.tensor([1, 2])))
    assert not shares.agrees_with(torch.tensor([0, 3, 7, 11]), real.phi_grad(other))


def _spread_loss(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The spread of the examples' losses, from one batched forward: the layers see the
    batch first, but an example's weight depends on the others (the batch mean), so a
    micro-batch's gradient is not a multiple of its examples' shares of the whole split's.
    (A soft maximum would not do: its weights differ from the split's by one factor.)"""
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none").view(labels.shape)
    per_example = ce.sum(1) / (labels != -100).sum(1)
    return (per_example - per_example.mean()).square().mean()


def _lora_setting(rank: int = 2) -> Setting:
    return Setting(PrecisionStack("bf16", None, "nearest", "fp32"), Subspace("lora", rank, "all-linear"), OptimizerSpec("adamw", 1e-3))


def _run(model, batch, loss_fn, **options):
    opts = BurstOptions(**{"steps": 2, "samples": 16, "micro_batch": 4, "early_stop": False, **options})
    return run_sweep(model, settings=[_lora_setting()], loss_fn=loss_fn, loss_name="t", train=batch, val=None,
                     options=opts, model_source="t", calib="t", val_source="t").settings[0]


def test_a_loss_that_does_not_split_by_example_falls_back_to_direct_gradients():
    model, batch = _llama()
    res = _run(model, batch, _spread_loss, samples=8)
    assert [s.g_b for s in res.pt] == ["direct", "direct"]
    # start (its shares fail the check at step 0), burst steps, every sample at step 0,
    # then the split and every sample at the last state
    assert res.backwards == 1 + 2 + 8 + 1 + 8


def test_burst_with_shares_gives_the_p_t_counts_of_direct_gradients(monkeypatch):
    model, batch = _llama()
    fast = _run(model, batch, causal_lm)
    assert [s.g_b for s in fast.pt] == ["example shares", "example shares"]
    # one backward for the split at the start (reused by p_t at step 0), one per burst
    # step, and at the last state the split and the one directly checked micro-batch
    assert fast.backwards == 1 + 2 + 1 + 1 + 1

    monkeypatch.setattr(ExampleShares, "supported", staticmethod(lambda module, real: False))
    slow = _run(model, batch, causal_lm)
    assert [s.g_b for s in slow.pt] == ["direct", "direct"]
    assert slow.backwards == 1 + 2 + 16 + 1 + 16
    for a, b in zip(fast.pt, slow.pt, strict=True):
        assert (a.optimizer.successes, a.optimizer.n, a.blocked) == (b.optimizer.successes, b.optimizer.n, b.blocked)
        assert (a.uniform.successes, a.uniform.n) == (b.uniform.successes, b.uniform.n)
        assert {k: r.successes for k, r in a.surrogate.items()} == {k: r.successes for k, r in b.surrogate.items()}
    assert fast.steps == slow.steps


def test_layers_that_fold_the_batch_into_tokens_are_not_split():
    class Folded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.reshape(-1, 4))  # [N * T, 4]: examples are not the first dimension

    model = Folded()
    params = parameter_universe(model)
    s = Setting(PrecisionStack("fp32", None, "nearest", "fp32"), Subspace("lora", 1, "all-linear"), OptimizerSpec("adamw", 1e-3))
    real = Realization(s, params, {k: v.detach() for k, v in model.named_parameters()}, torch.Generator().manual_seed(0))
    evaluator = LossEvaluator(model, lambda m, b: m(b["x"]).square().mean())
    shares = ExampleShares(model, real, 5)
    with shares.recording():
        evaluator.loss_and_grad(real.realized(), {"x": torch.randn(5, 2, 4)})
    assert not shares.usable


def test_full_and_sparse_settings_do_not_use_shares():
    model, _ = _llama()
    params = parameter_universe(model)
    base = {k: v.detach() for k, v in model.named_parameters()}
    for sub in (Subspace("full", 0, "all-linear"), Subspace("sparse", 0, "all-linear", sparsity=0.5)):
        real = Realization(Setting(PrecisionStack("fp32", None, "nearest", "fp32"), sub, OptimizerSpec("adamw", 1e-3)),
                           params, base, torch.Generator().manual_seed(0))
        assert not ExampleShares.supported(model, real)


def test_micro_batches_index_and_batch_agree():
    batch = {"x": torch.arange(10).unsqueeze(1)}
    a, b = MicroBatches(batch, 3, seed=4), MicroBatches(batch, 3, seed=4)
    for _ in range(7):
        assert torch.equal(take(batch, a.next_index())["x"], b.next()["x"])
