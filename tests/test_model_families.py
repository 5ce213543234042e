"""Model families beyond Llama and BERT, built from local configs as a user would have
them: the presets name their projections, an encoder-decoder with a head is not taken
for a headless encoder, and a vision model trains on pixel_values with its own loss."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from hallway_audit.cli import main
from hallway_audit.model.losses import _headless
from hallway_audit.probe.targets import parameter_universe, select_targets

transformers = pytest.importorskip("transformers")
V = 64


def _quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build().float().eval()


FAMILIES = {  # name -> (builder, the layers of block 0 each preset should pick)
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)),
        {"attention": {"gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.0.attention.dense"},
         "mlp": {"gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"}}),
    "falcon": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, new_decoder_architecture=False)),
        {"attention": {"transformer.h.0.self_attention.query_key_value", "transformer.h.0.self_attention.dense"},
         "mlp": {"transformer.h.0.mlp.dense_h_to_4h", "transformer.h.0.mlp.dense_4h_to_h"}}),
    "phi": (lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)),
        {"attention": {f"model.layers.0.self_attn.{k}" for k in ("q_proj", "k_proj", "v_proj", "dense")},
         "mlp": {"model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2"}}),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(  # fused qkv_proj and gate_up_proj
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, pad_token_id=0)),
        {"attention": {"model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj"},
         "mlp": {"model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"}}),
    "distilbert": (lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=V, dim=32, n_layers=1, n_heads=4, hidden_dim=64)),
        {"attention": {f"distilbert.transformer.layer.0.attention.{k}" for k in ("q_lin", "k_lin", "v_lin", "out_lin")},
         "mlp": {"distilbert.transformer.layer.0.ffn.lin1", "distilbert.transformer.layer.0.ffn.lin2"}}),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)),
        {"attention": {f"{side}.block.0.layer.0.SelfAttention.{k}" for side in ("encoder", "decoder") for k in "qkvo"}
         | {f"decoder.block.0.layer.1.EncDecAttention.{k}" for k in "qkvo"},
         "mlp": {"encoder.block.0.layer.1.DenseReluDense.wi", "encoder.block.0.layer.1.DenseReluDense.wo",
                 "decoder.block.0.layer.2.DenseReluDense.wi", "decoder.block.0.layer.2.DenseReluDense.wo"}}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_pick_each_familys_projections_and_nothing_twice(family):
    build, want = FAMILIES[family]
    params = parameter_universe(_quiet(build))
    picked = {preset: {p.layer for p in select_targets(params, preset)} for preset in ("attention", "mlp")}
    for preset, layers in want.items():
        assert picked[preset] == layers, (preset, picked[preset] ^ layers)
    assert not picked["attention"] & picked["mlp"]
    everything = {p.layer for p in select_targets(params, "all-linear")}
    assert picked["attention"] | picked["mlp"] <= everything


def test_t5_with_its_lm_head_is_not_headless_but_a_bare_encoder_is():
    """T5's base_model_prefix names no attribute of T5ForConditionalGeneration, so
    `base_model is module` alone mistook it for a model without a head."""
    t5 = _quiet(FAMILIES["t5"][0])
    assert t5.base_model is t5 and not _headless(t5, "hf")
    encoder = _quiet(lambda: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)))
    assert _headless(encoder, "hf")


def _audit(tmp_path, capsys, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    model.save_pretrained(tmp_path / "model")
    save_file(batch, str(tmp_path / "calib.safetensors"))
    code = main([str(tmp_path / "model"), "--calib", str(tmp_path / "calib.safetensors"), "--rank", "4",
                 "--precision", "bf16", "--lr", "1e-3", "--steps", "2", "--samples", "8", "-q", "--format", "json"])
    assert code in (0, 1)
    return json.loads(capsys.readouterr().out)


def test_t5_audits_with_its_own_seq2seq_loss(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (16, 8), generator=g)
    doc = _audit(tmp_path, capsys, _quiet(FAMILIES["t5"][0]), {"input_ids": ids, "labels": ids.flip(1)})
    assert doc["dynamic"]["loss"] == "model_loss"
    assert doc["settings"][0]["model"]["initial_loss"] > 0


def test_a_vision_model_trains_on_pixel_values(tmp_path, capsys):
    vit = _quiet(lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, num_labels=5)))
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(16, 3, 16, 16, generator=g), "labels": torch.randint(0, 5, (16,), generator=g)}
    doc = _audit(tmp_path, capsys, vit, batch)
    assert doc["dynamic"]["loss"] == "model_loss" and doc["dynamic"]["tokens"] == 12  # 12 training examples
    adapted = {layer["name"] for layer in doc["settings"][0]["layers"] if layer.get("planned_rank")}
    assert adapted and not any("classifier" in name for name in adapted)


def _tiny_mixtral() -> torch.nn.Module:
    return _quiet(lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)))


def test_fused_moe_experts_are_quantized_like_linear_weights():
    """transformers v5 holds an MoE layer's experts as one 3-D parameter, not nn.Linear;
    fp8 / nf4 recipes quantize the experts, so the probe must too (the router stays)."""
    from hallway_audit.probe import OptimizerSpec, PrecisionStack, Setting, Subspace
    from hallway_audit.probe.realize import Realization
    from hallway_audit.probe.targets import param_dict

    model = _tiny_mixtral()
    params = parameter_universe(model)
    stacked = {p.name for p in params if p.stacked}
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    assert stacked == experts and experts  # every fused expert stack, nothing else
    assert not any(p.linear for p in params if p.stacked)  # never a LoRA target
    for fmt, quantize in (("fp8_e4m3", "auto"), ("nf4", "auto"), ("fp8_e4m3", "linear")):
        setting = Setting(PrecisionStack(fmt, scope=quantize), Subspace("full"), OptimizerSpec("adamw", 1e-4))
        real = Realization(setting, params, param_dict(model), torch.Generator().manual_seed(0))
        assert all(real.quantized(n) for n in experts), fmt
        assert not real.quantized("model.embed_tokens.weight") and not real.quantized("lm_head.weight")
        router = [n for n in dict(model.named_parameters()) if n.endswith("gate.weight") and "experts" not in n]
        assert router and not any(real.quantized(n) for n in router)


def test_moe_experts_stored_per_expert_keep_their_static_figures_in_a_dynamic_run(tmp_path, capsys):
    """On disk the experts are one matrix each (`block_sparse_moe.experts.0.w1`), in memory one
    stacked parameter: the dynamic run's scope still shows fp8's figures of the stored
    experts, and its bursts round the stacked experts (no master weights: none crosses)."""
    model = _tiny_mixtral()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, V, (16, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids, "labels": ids.clone()}, str(tmp_path / "calib.safetensors"))
    code = main([str(tmp_path / "model"), "--calib", str(tmp_path / "calib.safetensors"), "--precision", "fp8_e4m3",
                 "--master-weights", "none", "--steps", "2", "--samples", "8", "-q", "--format", "json"])
    assert code in (0, 1)
    doc = json.loads(capsys.readouterr().out)
    stored_experts = [layer["name"] for layer in doc["static"]["layers"] if ".experts." in layer["name"]]
    assert stored_experts  # the checkpoint's per-expert matrices
    evaluated = {o["layer"] for o in doc["outcomes"] if o["rule"] == "weights-cannot-move" and o["setting"] == "fp8_e4m3"}
    assert set(stored_experts) <= evaluated  # fp8 applies to them: their static figures are evaluated
    layers = {layer["name"]: layer for layer in doc["settings"][0]["layers"]}
    fused = [name for name in layers if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused and all(layers[name]["beta"] == 0.0 for name in fused)  # rounded onto fp8: lr 1e-4 never crosses
    assert layers["model.embed_tokens"]["beta"] > 0.0  # fp32 under fp8's scope: it moves
