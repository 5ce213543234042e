"""The probe models what frameworks run: PEFT / QLoRA keep a quantized base frozen and
train adapters in their own dtype; fp8/int/nf4 formats quantize linear weights only.

Checked against PEFT itself where it can be: the forward a burst realizes for a LoRA
target equals a PEFT LoraLayer over the quantized base with the same adapters.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama_model

from hallway_audit.lattice import get_format
from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import BurstOptions, OptimizerSpec, PrecisionStack, Setting, Subspace, run_sweep
from hallway_audit.probe.realize import Realization
from hallway_audit.probe.targets import param_dict, parameter_universe


def _realization(model: torch.nn.Module, precision: PrecisionStack, subspace: Subspace) -> Realization:
    setting = Setting(precision, subspace, OptimizerSpec("adamw", 1e-3))
    return Realization(setting, parameter_universe(model), {k: v.float() for k, v in param_dict(model).items()},
                       torch.Generator().manual_seed(0))


def _batch(n: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4", "nf4"])
def test_coarse_formats_quantize_linear_weights_only(fmt):
    model = tiny_llama_model()
    real = _realization(model, PrecisionStack(fmt), Subspace("full"))
    base = {k: v.float() for k, v in param_dict(model).items()}
    now = real.realized()
    lattice_w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(now[lattice_w], get_format(fmt).at(base[lattice_w]).quantize(base[lattice_w]))
    for kept in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        assert torch.equal(now[kept], base[kept]), kept
    # scope="all" is hallway-audit 0.3's behaviour: every float parameter on the lattice
    everything = _realization(model, PrecisionStack(fmt, scope="all"), Subspace("full")).realized()
    norm = "model.norm.weight"
    assert torch.equal(everything[norm], get_format(fmt).at(base[norm]).quantize(base[norm]))


def test_bf16_casts_every_parameter():
    model = tiny_llama_model()
    now = _realization(model, PrecisionStack("bf16"), Subspace("full")).realized()
    for name, w in param_dict(model).items():
        assert torch.equal(now[name], w.float().to(torch.bfloat16).float()), name


def test_frozen_base_forward_equals_a_peft_lora_layer_over_the_quantized_base():
    """Q(W0) + s B A, with A and B as the burst holds them, is what PEFT computes."""
    peft = pytest.importorskip("peft")
    model = tiny_llama_model()
    real = _realization(model, PrecisionStack("nf4"), Subspace("lora", 4, "all-linear", alpha=8.0))
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():  # give B a value, as after some steps
        real.phi[name + "::B"].copy_(torch.randn(real.phi[name + "::B"].shape, generator=torch.Generator().manual_seed(3)))
    realized = real.realized()[name]
    base = param_dict(model)[name].float()
    q0 = get_format("nf4").at(base).quantize(base)

    linear = torch.nn.Linear(base.shape[1], base.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(q0)
    holder = torch.nn.Sequential(linear)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(holder, config)
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(real.phi[name + "::A"])
        layer.lora_B["default"].weight.copy_(real.phi[name + "::B"])
    x = torch.randn(5, base.shape[1], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.nn.functional.linear(x, realized), wrapped(x), rtol=1e-5, atol=1e-6)
    # the base under the adapters is the nf4 base, not a re-quantized sum
    s = real.lora[name][0]
    torch.testing.assert_close(realized - s * (real.phi[name + "::B"] @ real.phi[name + "::A"]), q0, rtol=0, atol=1e-6)


def test_frozen_base_starts_at_the_quantized_base_and_merged_mode_rounds_the_sum():
    model = tiny_llama_model()
    name = "model.layers.0.self_attn.v_proj.weight"
    base = param_dict(model)[name].float()
    lattice = get_format("fp8_e4m3").at(base)
    frozen = _realization(model, PrecisionStack("fp8_e4m3"), Subspace("lora", 4))
    assert torch.equal(frozen.realized()[name], lattice.quantize(base))  # B = 0
    merged = _realization(model, PrecisionStack("fp8_e4m3"), Subspace("lora", 4, base="merged"))
    with torch.no_grad():
        for real in (frozen, merged):
            real.phi[name + "::B"].fill_(1e-3)
    w = frozen.stored()[name]
    assert torch.equal(merged.realized()[name], get_format("fp8_e4m3").at(w).quantize(w))
    assert not torch.equal(frozen.realized()[name], merged.realized()[name])


@pytest.mark.parametrize("fmt", ["nf4", "int4", "fp8_e4m3"])
def test_lora_over_a_quantized_base_moves_its_adapters(fmt):
    """QLoRA trains: the adapters (fp32) cross cells at every step; the merged mode is
    the one where sub-cell adapter products round away."""
    model = tiny_llama_model()
    batch = _batch()
    train = {k: v[:12] for k, v in batch.items()}
    val = {k: v[12:] for k, v in batch.items()}
    options = BurstOptions(steps=3, samples=8, micro_batch=4, eval_batch=8)
    settings = [Setting(PrecisionStack(fmt), Subspace("lora", 4, base=base), OptimizerSpec("adamw", 1e-4))
                for base in ("frozen", "merged")]
    result = run_sweep(model, settings=settings, loss_fn=causal_lm, loss_name="causal_lm", train=train, val=val,
                       options=options, model_source="t", calib="t", val_source="t")
    frozen, merged = result.settings
    frozen_beta = [s.beta for s in frozen.steps[1:]]
    assert all(b is not None and b > 0.5 for b in frozen_beta), frozen_beta  # B = 0 at step 0: A has no gradient
    assert frozen.steps[-1].loss < frozen.initial_loss
    merged_beta = [s.beta for s in merged.steps]
    assert max(b for b in merged_beta if b is not None) < min(frozen_beta)


def test_recommended_lora_config_builds_with_peft_and_adapts_what_it_names(tmp_path, ckpt_hf_llama_dir):
    """The paste-ready config is complete: PEFT adapts exactly the recommended setting's
    targets, every one at the stated rank and alpha."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from hallway_audit import DynamicPlan, SweepSpec, audit

    path, _ = ckpt_hf_llama_dir
    save_file(_batch(24), str(tmp_path / "calib.safetensors"))
    plan = DynamicPlan(calib=str(tmp_path / "calib.safetensors"),
                       sweep=SweepSpec(precision=["bf16"], rank=[2, 8], lr=[1e-3]),
                       burst=BurstOptions(steps=2, samples=8, micro_batch=4, eval_batch=8))
    result = audit(path, dynamic=plan, formats=["bf16"])
    rec = result.recommendation
    assert rec is not None and rec.setting is not None and rec.lora_config is not None
    chosen = next(s for s in result.dynamic.settings if s.id == rec.setting)
    adapted = {name for name, d in chosen.layers.items() if d.planned_rank is not None}
    model = AutoModelForCausalLM.from_pretrained(path)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**rec.lora_config))
    got = {name.removeprefix("base_model.model."): m for name, m in wrapped.named_modules()
           if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(got) == adapted
    for m in got.values():
        assert m.r["default"] == rec.lora_config["r"] == chosen.setting.subspace.rank
        assert m.lora_alpha["default"] == rec.lora_config["lora_alpha"]


def test_recommendation_when_every_passing_loss_rose(tmp_path):
    """A sweep whose only passing settings have negative scores (the loss rose in the
    burst) still recommends one: the cheapest within 10% of the best, measured on |best|."""
    from hallway_audit.probe.horizon import RunForecast, Schedule
    from hallway_audit.probe.result import SettingResult, StepRecord
    from hallway_audit.probe.sweep import DynamicResult
    from hallway_audit.recommend import recommend

    def result(rank: int, losses: list[float]) -> SettingResult:
        steps = [StepRecord(i, x, None, x, None, None, None, None, None, 0.0) for i, x in enumerate(losses)]
        return SettingResult(Setting(PrecisionStack("bf16"), Subspace("lora", rank), OptimizerSpec("adamw", 1e-3)),
                             "t", 10, 1.0, None, steps, {}, [], None, 0.0, 0, 0, Schedule("constant", 8),
                             RunForecast(1.0, 1.0, None))

    settings = [result(16, [1.5, 2.0]), result(4, [1.5, 2.1]), result(2, [3.0, 4.0])]
    dyn = DynamicResult("m", "t", "c", "v", 10, 2, 10, BurstOptions(), "cpu", settings, 0.0)
    rec = recommend(dyn, [])
    # scores -1.0, -1.1, -3.0: r4 is within 10% of |best|, r2 is not
    assert rec.setting == settings[1].id


def test_recommendation_between_equally_cheap_settings_takes_the_better_score():
    """fp8 with and without master weights cost the same rank and bits: between equals the
    higher score wins, whatever the sweep's order (before, the first listed won: on the
    held-out decay subject int4 without master weights, 0.64 in training, over its
    fp32-master twin, 0.74)."""
    from hallway_audit.probe.horizon import RunForecast, Schedule
    from hallway_audit.probe.result import SettingResult, StepRecord
    from hallway_audit.probe.sweep import DynamicResult
    from hallway_audit.recommend import _score, recommend

    def result(master: str, losses: list[float]) -> SettingResult:
        steps = [StepRecord(i, x, None, x, None, None, None, None, None, 0.0) for i, x in enumerate(losses)]
        out = SettingResult(Setting(PrecisionStack("fp8_e4m3", master_weights=master), Subspace("full"),  # type: ignore[arg-type]
                                    OptimizerSpec("adamw", 1e-3)),
                            "t", 10, 1.0, None, steps, {}, [], None, 0.0, 0, 0, Schedule("constant", 8),
                            RunForecast(1.0, 1.0, None))
        out.horizon = 1.0  # score = progress
        return out

    for order in ((0, 1), (1, 0)):
        pair = [result("none", [0.5, 0.45]), result("fp32", [0.5, 0.4])]  # scores 0.55 and 0.6: within 10%
        assert [_score(r) for r in pair] == pytest.approx([0.55, 0.6])
        settings = [pair[i] for i in order]
        dyn = DynamicResult("m", "t", "c", "v", 10, 2, 10, BurstOptions(), "cpu", settings, 0.0)
        assert recommend(dyn, []).setting == pair[1].id
