"""p_t with several moves per forward (vmap over stacked weight sets) against the loop.

The batched path draws the same moves in the same order and stops at the same checks,
so the counts and decisions are equal; each move's loss comes from a vmapped forward,
which may sum in another order than the plain forward (~1e-7 relative on the loss), so
the relative drops (descent) are compared to 1e-6 absolute (they are differences of
losses divided by the loss: a 1e-7 relative wobble of each loss is ~2e-7 there).

Equal counts need every move's loss to differ from the state's by more than that wobble:
a move within ~1e-7 of a tie may count as a descent on one path and not the other, and
if that moves an early stop, the draws that follow differ too. The cases below keep
clear of ties; the sign test itself compares two forwards of the same vmapped call (the
state rides along with its moves), so a move that changes nothing never counts.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model
from torch import nn

from hallway_audit.errors import UsageError
from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import BurstOptions, OptimizerSpec, PrecisionStack, Setting, Subspace, run_sweep
from hallway_audit.probe.pt import FIRST_CHECK, PtAtState, chunk_end
from hallway_audit.probe.pt_batch import BATCH_ENV, moves_per_forward


def setting(weights="fp32", *, rounding="nearest", master="fp32", kind="full", rank=0, opt="adamw", lr=1e-3) -> Setting:
    return Setting(PrecisionStack(weights, None, rounding, master), Subspace(kind, rank, "all-linear"),
                   OptimizerSpec(opt, lr))


def pt_states(monkeypatch, moves: int, module, settings, loss_fn, batch, val=None, **options) -> list[list[PtAtState]]:
    monkeypatch.setenv(BATCH_ENV, str(moves))
    opts = BurstOptions(**{"steps": 2, "samples": 20, "micro_batch": 4, **options})
    results = run_sweep(module, settings=settings, loss_fn=loss_fn, loss_name="test", train=batch, val=val,
                        options=opts, model_source="test", calib="test", val_source="test").settings
    return [r.pt for r in results]


def counts(state: PtAtState) -> dict:
    """Everything but the descent magnitudes and how the moves were batched: must be equal."""
    return {
        "optimizer": vars(state.optimizer), "uniform": vars(state.uniform), "blocked": state.blocked,
        "blocked_uniform": state.blocked_uniform, "val": vars(state.val) if state.val else None,
        "surrogate": {k: vars(v) for k, v in state.surrogate.items()},
        "layers": {k: vars(v) for k, v in state.realized_layer.items()}, "radius": state.radius,
        "psi_val": state.psi_val, "g_b": state.g_b, "n_descent": len(state.descent),
    }


def assert_same(loop: list[list[PtAtState]], batched: list[list[PtAtState]], moves: int) -> None:
    assert len(loop) == len(batched)
    for by_loop, by_batch in zip(loop, batched, strict=True):
        assert [counts(s) for s in by_loop] == [counts(s) for s in by_batch]
        for a, b in zip(by_loop, by_batch, strict=True):
            assert b.descent == pytest.approx(a.descent, abs=1e-6, rel=1e-6)
            assert a.moves_per_forward == 1 and b.moves_per_forward == moves
            assert a.batch_note is None and b.batch_note is None


def tokens(seed: int, n: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


LLAMA_SETTINGS = [setting(), setting("bf16", kind="lora", rank=2, rounding="stochastic", master="none", lr=1e-2),
                  setting("fp8_e4m3", kind="lora", rank=2)]


@pytest.mark.parametrize("moves", [8, 5])
def test_batched_moves_on_a_tiny_llama_equal_the_loop(monkeypatch, moves):
    """vmap runs the HF Llama (SDPA through vmap's per-example fallback on CPU); 5 moves per forward
    cut at the checks (16) and at the end (20 samples); with a held-out batch. No per-layer p_t here:
    a norm layer's moves change the loss by ~1e-7 relative, where the two paths' sums may order a
    tie differently, and one flipped sign can move an early stop (see the module docstring)."""
    model, train, val = tiny_llama_model(), tokens(0, 12), tokens(1, 4)
    options = {"p_every": 2, "early_stop": True}
    loop = pt_states(monkeypatch, 0, model, LLAMA_SETTINGS, causal_lm, train, val, **options)
    batched = pt_states(monkeypatch, moves, model, LLAMA_SETTINGS, causal_lm, train, val, **options)
    assert_same(loop, batched, moves)
    assert any(s.descent for states in loop for s in states)


def mse(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(module(batch["inputs"]), batch["targets"])


def regression(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return {"inputs": x, "targets": torch.sin(x[:, :3]) + 0.1 * torch.randn(n, 3, generator=g)}


def sequential() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


# bf16 without master weights under nearest rounding: sub-ULP moves of some weights round back
# (blocked moves are judged without a forward, beside live ones in the same chunk)
SEQ_SETTINGS = [setting(), setting(opt="sgd", lr=0.05), setting("bf16", master="none", lr=3e-3),
                setting(kind="lora", rank=2), setting("bf16", kind="lora", rank=2, rounding="stochastic", master="none")]


@pytest.mark.parametrize("early_stop", [True, False])
def test_batched_moves_on_a_sequential_equal_the_loop(monkeypatch, early_stop):
    model, train, val = sequential(), regression(0, 32), regression(1, 8)
    options = {"samples": 40, "early_stop": early_stop, "per_layer_p": True, "steps": 3}
    loop = pt_states(monkeypatch, 0, model, SEQ_SETTINGS, mse, train, val, **options)
    batched = pt_states(monkeypatch, 8, model, SEQ_SETTINGS, mse, train, val, **options)
    assert_same(loop, batched, 8)
    optimizer_n = [s.optimizer.n for states in loop for s in states]
    assert all(n == 40 for n in optimizer_n) if not early_stop else any(n < 40 for n in optimizer_n)


def test_blocked_and_live_moves_in_one_chunk_equal_the_loop(monkeypatch):
    """Two weights a binade apart (bf16 ULPs 2^-8 and 2^-7), steps of ~1 ULP without master weights:
    a third to a half of the moves round back to the state (blocked, no forward), the rest are
    judged in the same vmapped forward."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.75, 1.5]]))

    def linear(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module[0].weight.sum()

    s = [setting("bf16", master="none", opt="sgd", lr=2e-3)]
    dummy = {"inputs": torch.zeros(8, 1)}
    loop = pt_states(monkeypatch, 0, model, s, linear, dummy, samples=40, early_stop=False)
    batched = pt_states(monkeypatch, 8, model, s, linear, dummy, samples=40, early_stop=False)
    assert_same(loop, batched, 8)
    for state in batched[0]:
        assert 5 < state.blocked < 35 and 5 < state.blocked_uniform < 35
        assert state.descent.count(0.0) == state.blocked


class Gated(nn.Module):
    """A branch on the weights' values: Python control flow that vmap cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y if float(self.inner[0].weight.detach().sum()) < 1e9 else -y


def test_a_model_vmap_cannot_run_falls_back_to_the_loop(monkeypatch):
    model, train = Gated(), regression(0, 32)
    loop = pt_states(monkeypatch, 0, model, [setting()], mse, train, samples=24)
    batched = pt_states(monkeypatch, 8, model, [setting()], mse, train, samples=24)
    assert [counts(s) for s in loop[0]] == [counts(s) for s in batched[0]]
    assert [s.descent for s in loop[0]] == [s.descent for s in batched[0]]  # the loop's own forwards: exact
    for state in batched[0]:
        assert state.moves_per_forward == 1
        assert state.batch_note is not None and "RuntimeError" in state.batch_note


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 9, 16, 64])
@pytest.mark.parametrize("samples", [7, 16, 20, 40, 64])
def test_chunks_cover_every_sample_and_never_cross_a_check(size, samples):
    for early_stop in (True, False):
        drawn, ends = 0, []
        while drawn < samples:
            end = chunk_end(drawn, samples, size, early_stop)
            assert drawn < end <= min(samples, drawn + size)
            ends.append(end)
            drawn = end
        checks = set(range(FIRST_CHECK, samples + 1, 8))
        assert ends[-1] == samples
        if early_stop:
            assert checks <= set(ends)  # early stopping looks exactly where the loop looks
        if size == 1:
            assert ends == list(range(1, samples + 1))


def test_the_cpu_default_is_the_loop_and_the_variable_is_checked(monkeypatch):
    weights = {"w": torch.zeros(2)}
    monkeypatch.delenv(BATCH_ENV, raising=False)
    assert moves_per_forward(weights, ["w"]) == 1
    monkeypatch.setenv(BATCH_ENV, "0")
    assert moves_per_forward(weights, ["w"]) == 1
    monkeypatch.setenv(BATCH_ENV, "12")
    assert moves_per_forward(weights, ["w"]) == 12
    for bad in ("eight", "-1", "2.5"):
        monkeypatch.setenv(BATCH_ENV, bad)
        with pytest.raises(UsageError, match=BATCH_ENV):
            moves_per_forward(weights, ["w"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_moves_on_cuda_equal_the_loop(monkeypatch):
    """The default on CUDA (8 moves per forward) against the loop, on the tiny Llama."""
    model = tiny_llama_model().cuda()
    train, val = ({k: v.cuda() for k, v in tokens(s, n).items()} for s, n in ((0, 12), (1, 4)))
    options = {"p_every": 2}
    loop = pt_states(monkeypatch, 0, model, LLAMA_SETTINGS, causal_lm, train, val, **options)
    monkeypatch.delenv(BATCH_ENV)
    assert moves_per_forward({"w": torch.zeros(1, device="cuda")}, ["w"]) == 8
    opts = BurstOptions(steps=2, samples=20, micro_batch=4, **options)
    batched = [r.pt for r in run_sweep(model, settings=LLAMA_SETTINGS, loss_fn=causal_lm, loss_name="test", train=train,
                                       val=val, options=opts, model_source="test", calib="test",
                                       val_source="test").settings]
    assert_same(loop, batched, 8)
