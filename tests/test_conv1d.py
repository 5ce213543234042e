"""GPT-2's linear layers are transformers' Conv1D (y = x @ W + b, W stored (in, out)).

PEFT adapts them (fan_in_fan_out) and bitsandbytes quantizes them transposed, so the
probe holds their weights as the (out, in) matrix and hands the module a transposed
view. Checked here against the model itself (loss and gradient), against PEFT's LoRA
on a Conv1D over a quantized base, against the direct micro-batch gradient (the
per-example shares), and end to end from a Hugging Face directory.
"""

from __future__ import annotations

import ast
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from hallway_audit.cli import main
from hallway_audit.lattice import get_format
from hallway_audit.model.data import take
from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import OptimizerSpec, PrecisionStack, Setting, Subspace
from hallway_audit.probe.engine import LossEvaluator
from hallway_audit.probe.realize import Realization
from hallway_audit.probe.shares import ExampleShares
from hallway_audit.probe.targets import param_dict, parameter_universe, select_targets
from hallway_audit.report.rows import peft_snippet

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).float().eval()


def _batch(n: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _realization(model: torch.nn.Module, precision: PrecisionStack, subspace: Subspace) -> Realization:
    setting = Setting(precision, subspace, OptimizerSpec("adamw", 1e-3))
    return Realization(setting, parameter_universe(model), param_dict(model), torch.Generator().manual_seed(0))


def test_conv1d_weights_are_linear_matrices_held_as_out_by_in():
    model = _gpt2()
    params = {p.name: p for p in parameter_universe(model)}
    c_fc = params["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.linear and c_fc.shape == (128, 32)  # stored (32, 128): in x out
    assert param_dict(model)["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)
    assert not params["transformer.h.0.ln_1.weight"].linear and not params["transformer.wte.weight"].linear
    listed = list(params.values())
    attention = {p.layer for p in select_targets(listed, "attention")}
    mlp = {p.layer for p in select_targets(listed, "mlp")}
    assert attention == {f"transformer.h.{i}.attn.{k}" for i in range(2) for k in ("c_attn", "c_proj")}
    assert mlp == {f"transformer.h.{i}.mlp.{k}" for i in range(2) for k in ("c_fc", "c_proj")}
    assert {p.layer for p in select_targets(listed, "all-linear")} == attention | mlp  # the tied head is no target


def test_the_evaluator_gives_the_models_own_loss_and_gradient():
    model, batch = _gpt2(), _batch()
    weights = param_dict(model)
    loss, grads = LossEvaluator(model, causal_lm).loss_and_grad(weights, batch)
    model.zero_grad()
    own = causal_lm(model, batch)
    own.backward()
    assert loss == pytest.approx(float(own.detach()), rel=1e-6)
    for name, p in model.named_parameters():
        want = p.grad.T if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else p.grad
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-7)


def test_lora_on_conv1d_over_nf4_equals_peft():
    """Q(W0) + s B A in the (out, in) layout is PEFT's LoRA on a Conv1D (fan_in_fan_out),
    with the nf4 blocks taken along `in`, as bitsandbytes stores the transposed weight."""
    peft = pytest.importorskip("peft")
    model = _gpt2()
    real = _realization(model, PrecisionStack("nf4"), Subspace("lora", 4, "all-linear", alpha=8.0))
    name = "transformer.h.1.attn.c_attn.weight"
    with torch.no_grad():
        real.phi[name + "::B"].copy_(torch.randn(real.phi[name + "::B"].shape, generator=torch.Generator().manual_seed(3)))
    realized = real.realized()[name]  # (out, in)
    stored = model.get_submodule("transformer.h.1.attn.c_attn").weight.detach()  # (in, out)
    q0 = get_format("nf4").at(stored.T.contiguous()).quantize(stored.T.contiguous())

    conv = transformers.pytorch_utils.Conv1D(stored.shape[1], stored.shape[0])
    with torch.no_grad():
        conv.weight.copy_(q0.T)
        conv.bias.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(torch.nn.Sequential(conv), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0, fan_in_fan_out=True))
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(real.phi[name + "::A"])
        layer.lora_B["default"].weight.copy_(real.phi[name + "::B"])
    x = torch.randn(5, stored.shape[0], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(x @ realized.T, wrapped(x), rtol=1e-5, atol=1e-5)
    # PEFT's init: A is (r, in) with in = the layer's true fan-in
    assert real.phi[name + "::A"].shape == (4, stored.shape[0])


def test_example_shares_on_conv1d_point_where_the_direct_gradient_does():
    model, batch = _gpt2(), _batch()
    real = _realization(model, PrecisionStack("fp32", None, "nearest", "fp32"), Subspace("lora", 2, "all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B off zero: both shares nonzero
        for k, v in real.phi.items():
            if k.endswith("::B"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    real._bases.clear()
    evaluator, now = LossEvaluator(model, causal_lm), real.realized()
    assert ExampleShares.supported(model, real)
    shares = ExampleShares(model, real, 12)
    with shares.recording():
        evaluator.loss_and_grad(now, batch)
    assert shares.usable
    index = torch.tensor([0, 3, 7, 11])
    _, grads = evaluator.loss_and_grad(now, take(batch, index))
    assert shares.agrees_with(index, real.phi_grad(grads))


def test_gpt2_directory_audits_end_to_end_and_its_lora_config_builds(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model = _gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    ids = torch.randint(0, 64, (24, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 6:] = ids[:, :6]
    save_file({"input_ids": ids}, str(tmp_path / "calib.safetensors"))
    code = main([str(tmp_path / "gpt2"), "--calib", str(tmp_path / "calib.safetensors"), "--rank", "2,8",
                 "--precision", "nf4", "--lr", "1e-3", "--steps", "2", "--samples", "8", "-q", "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    setting = doc["settings"][0]
    adapted = {layer["name"] for layer in setting["layers"] if layer.get("planned_rank")}
    assert adapted == {f"transformer.h.{i}.{k}" for i in range(2) for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(layer["r_star"] for layer in setting["layers"] if layer["name"] in adapted)
    config = doc["recommendation"]["lora_config"]
    assert config["fan_in_fan_out"] is True
    # the paste-ready line in the table and the Markdown is this config, key for key
    for snippet in (peft_snippet(doc["recommendation"]), peft_snippet(doc["recommendation"], quote=repr)):
        call = ast.parse(snippet, mode="eval").body
        assert isinstance(call, ast.Call) and call.func.id == "LoraConfig" and not call.args
        assert {k.arg: ast.literal_eval(k.value) for k in call.keywords} == config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), peft.LoraConfig(**config))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # nothing for PEFT to correct
    got = {n.removeprefix("base_model.model."): m for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(got) == adapted and all(m.r["default"] == config["r"] for m in got.values())
