"""The memory estimate (hallway_audit.memory): its components against what torch allocates on a
tiny Llama (fixed seed), what a device can hold (overrides, cgroup limits), and the refusal
through the CLI: exit 6, one line with the figures, no traceback, before any burst."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLE, tiny_llama_model
from hostile.harness import assert_refused, run_cli

from hallway_audit.cli import main
from hallway_audit.errors import ExitCode, ResourceError, UsageError
from hallway_audit.memory import (
    DEVICE_MEMORY_ENV,
    FLOAT32,
    ActivationShape,
    capacity,
    cgroup_available,
    check_memory,
    estimate_memory,
    parse_size,
    peak_allocated,
    sweep_memory,
    tokens_per_example,
)
from hallway_audit.model.loaded import LoadedModel
from hallway_audit.model.losses import resolve_loss
from hallway_audit.probe import BurstOptions, run_sweep
from hallway_audit.probe.settings import PrecisionStack, Setting, Subspace

CALIB = EXAMPLE / "calib.safetensors"
# The estimate is an upper bound that should not be loose: measured peaks (torch.profiler's
# memory events, every CPU allocation) of whole sweeps on the tiny Llama came to 0.88-0.95 of it.
TOLERANCE = 1.3
OPTIONS = BurstOptions(steps=2, samples=8, micro_batch=4, eval_batch=8)


def llama_batches(seed: int = 0, n: int = 12, t: int = 16) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, t), generator=g)
    return {"input_ids": ids, "labels": ids}, {"input_ids": ids[:4], "labels": ids[:4]}


def lora(rank: int, fmt: str = "fp32") -> Setting:
    return Setting(precision=PrecisionStack(weights=fmt), subspace=Subspace(kind="lora", rank=rank))


def full(fmt: str = "fp32") -> Setting:
    return Setting(precision=PrecisionStack(weights=fmt))


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("1MiB", 1 << 20), ("20GiB", 20 << 30), ("512MB", 512 * 10**6), ("1.5 GB", 1_500_000_000),
    ("1048576", 1 << 20), (4096, 4096), ("2kib", 2048),
])
def test_sizes_parse_with_binary_and_decimal_units(text, expected):
    assert parse_size(text, "x") == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "1 parsec", "1e3GiB", "nan", True, None, "9" * 40 + "TiB"])
def test_bad_sizes_are_one_usage_line_naming_the_source(text):
    with pytest.raises(UsageError, match=r"^--max-memory: expected a size"):
        parse_size(text, "--max-memory")


# ----------------------------------------------------------------------------- components


def test_weights_and_optimizer_states_are_exactly_what_torch_holds():
    model = tiny_llama_model()
    est = estimate_memory(model, [full(), lora(4)], OPTIONS, train_examples=12, val_examples=4, tokens_per_example=16)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for s in est.settings:
        assert s.devices["cpu"].weights == held
    # AdamW's states after a real step: exp_avg and exp_avg_sq, float32, per trained number
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    states = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items() if k != "step")
    assert est.settings[0].devices["cpu"].optimizer_states == states
    # LoRA r4: A (4 x in) and B (out x 4) per linear target, the head excluded
    targets = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    phi = sum(4 * (m.in_features + m.out_features) for m in targets)
    assert est.settings[1].devices["cpu"].optimizer_states == 2 * FLOAT32 * phi


def test_activation_component_bounds_a_forward_and_backward():
    model = tiny_llama_model()
    train, _ = llama_batches()
    shape = ActivationShape.of(model, tokens_per_example(train))
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    grads: list = []

    def forward_backward() -> None:
        out = torch.func.functional_call(model, params, (train["input_ids"],), {"labels": train["labels"]})
        grads.append(torch.autograd.grad(out.loss, list(params.values())))

    measured = peak_allocated(forward_backward).bytes - sum(p.numel() * 4 for p in params.values())
    assert 0 < measured <= shape.with_grad(12) <= TOLERANCE * 1.5 * measured
    with torch.no_grad():
        peak = peak_allocated(lambda: model(train["input_ids"][:8], labels=train["labels"][:8])).bytes
    assert peak <= shape.without_grad(8)


@pytest.mark.parametrize("setting", [full(), full("bf16"), lora(4), lora(4, "bf16"), Setting(subspace=Subspace(kind="sparse", sparsity=0.5))],
                         ids=lambda s: s.id)
def test_estimate_bounds_the_peak_of_a_whole_sweep(setting):
    model = tiny_llama_model()
    train, val = llama_batches()
    loaded = LoadedModel(model, "hf-causal-lm", "tiny", None, ("input_ids", "attention_mask", "labels"))
    name, loss = resolve_loss(None, loaded, train)
    est = sweep_memory(model, [setting], OPTIONS, train, val)
    need = est.need("cpu")
    peak = peak_allocated(lambda: run_sweep(model, settings=[setting], loss_fn=loss, loss_name=name, train=train,
                                            val=val, options=OPTIONS, model_source="x", calib="x", val_source="x"))
    beyond = need.total - need.weights  # the weights were allocated before the sweep
    assert peak.bytes <= beyond <= TOLERANCE * peak.bytes, (peak.bytes, need)


def test_the_largest_setting_is_the_sweeps_need_and_lora_needs_less():
    model = tiny_llama_model()
    train, val = llama_batches()
    est = sweep_memory(model, [lora(2), full(), lora(8, "bf16")], OPTIONS, train, val)
    assert est.largest("cpu").setting == full().id
    sizes = {s.setting: s.total() for s in est.settings}
    assert sizes[lora(2).id] < sizes[lora(8, "bf16").id] < sizes[full().id]
    doc = est.to_dict()
    assert doc["devices"]["cpu"]["setting"] == full().id
    assert doc["devices"]["cpu"]["total"] == est.total == sizes[full().id]


def test_activations_grow_with_the_sequence_and_the_training_split():
    model = tiny_llama_model()
    a = estimate_memory(model, [lora(2)], OPTIONS, train_examples=12, val_examples=4, tokens_per_example=16)
    b = estimate_memory(model, [lora(2)], OPTIONS, train_examples=12, val_examples=4, tokens_per_example=32)
    c = estimate_memory(model, [lora(2)], OPTIONS, train_examples=24, val_examples=4, tokens_per_example=16)
    act = [e.need("cpu").activations for e in (a, b, c)]
    assert act[1] == pytest.approx(2 * act[0], rel=0.01) and act[2] == pytest.approx(2 * act[0], rel=0.01)
    assert tokens_per_example({"input_ids": torch.zeros(3, 7, dtype=torch.long)}) == 7
    assert tokens_per_example({"inputs": torch.zeros(3, 7)}) == 1


# ----------------------------------------------------------------------------- capacity


def test_the_override_sets_every_device_and_a_bad_one_is_a_usage_error(monkeypatch):
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "3GiB")
    assert capacity("cpu", 10) == (3 << 30, f"{DEVICE_MEMORY_ENV}=3GiB")
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "lots")
    with pytest.raises(UsageError, match=DEVICE_MEMORY_ENV):
        capacity("cpu", 0)


def test_without_an_override_the_loaded_weights_count_as_holdable(monkeypatch):
    monkeypatch.delenv(DEVICE_MEMORY_ENV, raising=False)
    monkeypatch.delenv("HALLWAY_AUDIT_MEMORY_GB", raising=False)
    free, source = capacity("cpu", 1 << 20)
    assert free > 1 << 20 and "of weights already loaded" in source


def cgroup_files(tmp_path: Path, version: int, limit: str, usage: int, inactive: int) -> tuple[Path, Path]:
    tmp_path.mkdir(exist_ok=True)
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    if version == 2:
        proc.write_text("0::/job\n")
        d = root / "job"
        d.mkdir(parents=True)
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon 5\ninactive_file {inactive}\n")
    else:
        proc.write_text("5:cpu:/\n4:memory:/job\n")
        d = root / "memory" / "job"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(limit + "\n")
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"inactive_file 1\ntotal_inactive_file {inactive}\n")
    return proc, root


@pytest.mark.parametrize("version", [1, 2])
def test_a_container_limit_is_read_from_the_memory_cgroup(tmp_path, version):
    proc, root = cgroup_files(tmp_path, version, str(8 << 30), 6 << 30, 1 << 30)
    assert cgroup_available(proc, root)[0] == 3 << 30  # 8 - 6 + 1 (reclaimable file cache)
    unlimited = "max" if version == 2 else "9223372036854771712"
    proc, root = cgroup_files(tmp_path / "u", version, unlimited, 6 << 30, 0)
    assert cgroup_available(proc, root) is None
    assert cgroup_available(tmp_path / "absent", root) is None


# ----------------------------------------------------------------------------- the refusal


def test_check_memory_names_the_figures_and_the_device(monkeypatch):
    model = tiny_llama_model()
    train, val = llama_batches()
    est = sweep_memory(model, [lora(2), full()], OPTIONS, train, val)
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(est.total))
    check_memory(est)  # exactly enough
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(est.total - 1))
    with pytest.raises(ResourceError) as info:
        check_memory(est)
    text = str(info.value)
    assert text.startswith(f"setting {full().id} needs ~") and "on cpu (weights " in text
    assert "gradients" in text and "AdamW states" in text and "activations" in text
    assert f"but cpu can hold {est.total - 1} bytes" not in text and "cpu can hold" in text and "try " in text


def test_the_refusal_through_the_cli_is_exit_6_and_one_line(capsys, monkeypatch):
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "1MiB")
    code = main([str(EXAMPLE), "--calib", str(CALIB), "--rank", "4,full", "--steps", "2", "--samples", "8"])
    out, err = capsys.readouterr()
    assert code == ExitCode.RESOURCES and out == "" and err.count("\n") == 1, err
    assert err.startswith("hallway-audit: error: setting bf16/full/adamw-0.0001 needs ~")
    assert "gradients" in err and "AdamW states" in err and f"{DEVICE_MEMORY_ENV}=1MiB" in err
    assert "plan:" not in err  # refused before the static pass and the plan


@pytest.mark.slow  # a fresh interpreter: ~20 s on the shared 2-core machine
def test_the_cli_refuses_with_exit_6_and_one_line_before_any_burst():
    outcome = run_cli([str(EXAMPLE), "--calib", str(CALIB), "--rank", "4,full", "--steps", "2", "--samples", "8",
                       "--format", "json"], env={DEVICE_MEMORY_ENV: "1MiB"})
    assert_refused(outcome, ExitCode.RESOURCES, needle="needs ~")
    line = outcome.stderr.strip().splitlines()[-1]
    assert "bf16/full/adamw-0.0001" in line and "gradients" in line and f"{DEVICE_MEMORY_ENV}=1MiB" in line
    assert "plan:" not in outcome.stderr and "static pass" not in outcome.stderr  # refused before the work
    assert outcome.stdout == ""


def test_a_bad_override_through_the_cli_is_exit_2(capsys, monkeypatch):
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "a lot")
    code = main([str(EXAMPLE), "--calib", str(CALIB), "--rank", "4", "--steps", "1", "--samples", "4", "-q"])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE and err.count("\n") == 1 and DEVICE_MEMORY_ENV in err


def test_the_json_and_the_plan_carry_the_estimate(capsys, monkeypatch):
    monkeypatch.delenv(DEVICE_MEMORY_ENV, raising=False)
    code = main([str(EXAMPLE), "--calib", str(CALIB), "--precision", "bf16", "--rank", "4", "--steps", "1",
                 "--samples", "4", "--format", "json"])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    memory = json.loads(out)["dynamic"]["memory"]
    cpu = memory["devices"]["cpu"]
    parts = ("weights", "gradients", "optimizer_states", "trainable", "copies", "activations", "activation_cells")
    assert cpu["total"] == sum(cpu[k] for k in parts) == memory["total_bytes"] and cpu["setting"] == "bf16/r4/adamw-0.0001"
    assert all(cpu[k] > 0 for k in parts)
    assert "memory: up to ~" in err and "on cpu for bf16/r4/adamw-0.0001 (weights" in err and "cpu can hold" in err


def test_eager_attention_adds_its_saved_scores():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    eager, sdpa = ActivationShape.of(model, 64), ActivationShape.of(tiny_llama_model(), 64)
    assert (eager.attention, sdpa.attention) == (8, 0)
    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(1))
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    out: list = []

    def forward_backward() -> None:
        loss = torch.func.functional_call(model, params, (ids,), {"labels": ids}).loss
        out.append(torch.autograd.grad(loss, list(params.values())))

    measured = peak_allocated(forward_backward).bytes - sum(p.numel() * 4 for p in params.values())
    assert measured <= eager.with_grad(4) <= 1.5 * measured
    assert measured > sdpa.with_grad(4)  # the scores are what sdpa's figure leaves out
