"""Which layers a weight format applies to (docs/definitions.md §4.3): the probe and the
static rules follow the frameworks: coarse formats quantize linear weights but the head."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import EXAMPLE, tiny_llama_model

from hallway_audit.checkpoint import layer_name
from hallway_audit.cli import main
from hallway_audit.probe import OptimizerSpec, PrecisionStack, Setting, Subspace
from hallway_audit.probe.realize import Realization
from hallway_audit.probe.targets import param_dict, parameter_universe
from hallway_audit.scope import format_scope, guessed_linear_layers, quantized_linear_layers
from hallway_audit.subjects import format_updates, rounds_stored


def _guess(module: torch.nn.Module) -> set[str]:
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for name, p in module.state_dict().items():
        shapes.setdefault(layer_name(name), []).append(tuple(p.shape))
    return guessed_linear_layers(shapes.items())


def test_guessed_linear_layers_match_the_model_on_llama_and_bert():
    """From names and shapes alone, the same layers as the model's nn.Linear weights
    other than the head: embeddings, norms and the head are left out."""
    from transformers import BertConfig, BertForSequenceClassification

    llama = tiny_llama_model()
    known = quantized_linear_layers(parameter_universe(llama))
    assert "lm_head" not in known and "model.embed_tokens" not in known and "model.layers.0.mlp.down_proj" in known
    assert _guess(llama) == known
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                        intermediate_size=64, vocab_size=100, num_labels=3))
    known = quantized_linear_layers(parameter_universe(bert))
    assert "classifier" not in known and "bert.pooler.dense" in known
    assert not any("embeddings" in n or "LayerNorm" in n for n in known)
    assert _guess(bert) == known


def test_format_scope_follows_quantize():
    scope = format_scope("auto", {"a.q_proj"})
    assert scope("bf16", "a.norm") and scope("fp32", "lm_head")  # cast-all formats apply everywhere
    assert scope("nf4", "a.q_proj") and not scope("nf4", "a.norm") and not scope("fp8_e4m3", "lm_head")
    assert format_scope("all", set())("nf4", "a.norm")
    assert not format_scope("linear", {"a.q_proj"})("bf16", "a.norm")


@pytest.mark.parametrize("quantize, head_quantized", [("auto", False), ("linear", False), ("all", True)])
def test_the_probe_leaves_the_head_in_fp32_under_a_coarse_format(quantize, head_quantized):
    module = tiny_llama_model()
    params = parameter_universe(module)
    setting = Setting(PrecisionStack("fp8_e4m3", None, "nearest", "fp32", scope=quantize), Subspace("full"),
                      OptimizerSpec("adamw", 1e-4))
    real = Realization(setting, params, param_dict(module), torch.Generator().manual_seed(0))
    assert real.quantized("lm_head.weight") is head_quantized
    assert real.quantized("model.layers.0.mlp.down_proj.weight")
    assert real.quantized("model.norm.weight") is (quantize == "all")


def _nf4_findings(capsys, *extra: str) -> set[tuple[str, str]]:
    # planned without master weights, so the "cannot move" rules apply to every layer nf4 covers
    code = main([str(EXAMPLE), "--precision", "nf4,bf16", "--master-weights", "none", "-q", "--format", "json", *extra])
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    return {(f["rule"], f["layer"]) for f in doc["findings"] if f.get("setting") == "nf4" and f.get("layer")}


def test_static_rules_see_a_format_only_where_it_applies(capsys):
    """nf4 on the example: under auto (the frameworks' scope) no nf4 finding names an
    embedding, a norm or the head; --quantize all (0.3's behaviour) brings them back."""
    def off_scope(found: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(r, layer) for r, layer in found if any(k in layer for k in ("embed", "norm", "lm_head"))}

    auto = _nf4_findings(capsys)
    assert auto and not off_scope(auto)  # the linear layers still have their findings
    forced = _nf4_findings(capsys, "--quantize", "all")
    assert {"lm_head", "model.embed_tokens"} <= {layer for _, layer in off_scope(forced)}


def test_bert_presets_put_each_layer_in_one_preset():
    """BERT's attention output (attention.output.dense) ends like its MLP output
    (output.dense): it belongs to attention only."""
    from transformers import BertConfig, BertModel

    from hallway_audit.probe.targets import select_targets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    vocab_size=100))
    params = parameter_universe(bert)
    mlp = {p.layer for p in select_targets(params, "mlp")}
    attention = {p.layer for p in select_targets(params, "attention")}
    assert mlp == {"encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"}
    assert attention == {f"encoder.layer.0.attention.self.{k}" for k in ("query", "key", "value")} | {
        "encoder.layer.0.attention.output.dense"}


def test_static_cannot_move_follows_the_planned_master_weights(capsys):
    """A static-only run knows the plan's --master-weights: with fp32 master weights (the
    default) sub-ULP steps accumulate, so "cannot move" does not apply; planned without
    them, every linear layer of the example is warned in fp8 at lr 1e-4, and the model too."""
    def cannot_move(*extra: str) -> set[tuple[str, str | None]]:
        code = main([str(EXAMPLE), "--precision", "fp8_e4m3", "-q", "--format", "json", *extra])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0  # warnings never fail the default gate
        return {(f["rule"], f.get("layer")) for f in doc["findings"] if "cannot-move" in f["rule"]}

    assert cannot_move() == set()
    assert cannot_move("--master-weights", "fp32") == set()
    stepped = cannot_move("--master-weights", "none")
    assert ("model-weights-cannot-move", None) in stepped
    assert {layer for rule, layer in stepped if rule == "weights-cannot-move"} >= {
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    # a sweep of both: some setting steps without them, so the warnings stand
    assert cannot_move("--master-weights", "fp32,none") == stepped


def test_static_cannot_move_follows_the_planned_rounding(capsys):
    """Stochastic rounding moves a step of r ULP with probability r, so without master
    weights the weights still move in expectation (on the validation suite bf16 at lr 1e-5
    without master weights trains like fp32 master weights under it, 0.32 each, and is
    stuck under nearest rounding): a static-only run planned with --rounding stochastic
    does not warn that they cannot move; a sweep that also rounds to nearest does."""
    def cannot_move(*extra: str) -> set[tuple[str, str | None]]:
        code = main([str(EXAMPLE), "--precision", "fp8_e4m3", "--master-weights", "none", "-q", "--format", "json",
                     *extra])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0
        return {(f["rule"], f.get("layer")) for f in doc["findings"] if "cannot-move" in f["rule"]}

    nearest = cannot_move()
    assert ("model-weights-cannot-move", None) in nearest
    assert cannot_move("--rounding", "nearest") == nearest
    assert cannot_move("--rounding", "stochastic") == set()
    assert cannot_move("--rounding", "stochastic,nearest") == nearest


_CANNOT_MOVE = ("weights-cannot-move", "weights-mostly-stuck", "model-weights-cannot-move")


def test_a_probe_burst_speaks_for_the_static_cannot_move_estimate(capsys):
    """bf16 at lr 1e-5 without master weights: a static-only run warns per layer that the
    weights cannot move (beta_pred, from a nominal Adam step). With --calib the burst
    forecasts the same thing over the run from the real steps (weights-do-not-cross-cells,
    layer-cannot-move), so default.yaml's three static rules are evaluated but stay quiet
    (probed = 1) instead of repeating it for every layer; strict.yaml still gates on them."""
    plan = [str(EXAMPLE), "--precision", "bf16", "--master-weights", "none", "--lr", "1e-5", "-q", "--format", "json"]
    probe = ["--calib", str(EXAMPLE / "calib.safetensors"), "--steps", "4", "--samples", "8"]

    def run(*extra: str) -> dict:
        main([*plan, *extra])
        return json.loads(capsys.readouterr().out)

    def fired(doc: dict) -> set[str]:
        return {f["rule"] for f in doc["findings"] if f["rule"] in _CANNOT_MOVE}

    static = run()
    assert static["static"]["updates"] == {"master_weights": ["none"], "rounding": ["nearest"],
                                           "rounds_stored": {"bf16": 1}, "probed": {"bf16": 0}}
    assert {"weights-cannot-move", "model-weights-cannot-move"} <= fired(static)
    probed = run(*probe)
    assert probed["static"]["updates"]["probed"] == {"bf16": 1}
    assert fired(probed) == set()
    evaluated = {o["layer"] for o in probed["outcomes"] if o["rule"] == "weights-cannot-move"}
    assert "model.layers.0.mlp.down_proj" in evaluated  # evaluated, not skipped: the rule decides
    assert {f["rule"] for f in probed["findings"]} & {"weights-do-not-cross-cells", "layer-cannot-move",
                                                       "small-layer-cannot-move"}  # the burst says it once
    strict = run(*probe, "--rules", "strict.yaml")
    assert "weights-cannot-move" in fired(strict)


def test_format_updates_from_the_plan_or_the_probed_settings():
    """Static-only: every format takes the planned master weights and rounding and none is
    probed; with probed settings, rounds_stored comes from them and probed names the formats
    a burst ran (a planned format no setting used stays 0)."""
    plain = format_updates(["bf16", "fp8_e4m3"], ["fp32", "none"], ["nearest"], None)
    assert plain.rounds_stored == {"bf16": 1, "fp8_e4m3": 1} and plain.probed == {"bf16": 0, "fp8_e4m3": 0}
    assert format_updates(["bf16"], ["fp32"], ["nearest"], None).rounds_stored == {"bf16": 0}
    assert format_updates(["bf16"], ["none"], ["stochastic"], None).rounds_stored == {"bf16": 0}
    ran = Setting(PrecisionStack("bf16", None, "nearest", "none"), Subspace("full"), OptimizerSpec("adamw", 1e-5))  # type: ignore[arg-type]
    probed = format_updates(["bf16", "fp8_e4m3"], ["none"], ["nearest"], [ran])
    assert probed.rounds_stored == {"bf16": 1} and probed.probed == {"bf16": 1, "fp8_e4m3": 0}


def test_probed_settings_round_stored_weights_only_under_nearest_rounding():
    """The dynamic run's map: a format counts as stepped when some setting stores its
    weights without master weights and rounds them to nearest; stochastic rounding, fp32
    master weights and LoRA over a frozen base leave it at 0."""
    def setting(fmt: str, rounding: str, master: str, rank: int = 0) -> Setting:
        sub = Subspace("lora", rank=rank) if rank else Subspace("full")
        return Setting(PrecisionStack(fmt, None, rounding, master), sub, OptimizerSpec("adamw", 1e-4))  # type: ignore[arg-type]

    assert rounds_stored([setting("bf16", "nearest", "none")]) == {"bf16": 1}
    assert rounds_stored([setting("bf16", "stochastic", "none")]) == {"bf16": 0}
    assert rounds_stored([setting("bf16", "nearest", "fp32")]) == {"bf16": 0}
    assert rounds_stored([setting("nf4", "nearest", "none", rank=4)]) == {"nf4": 0}
    assert rounds_stored([setting("bf16", "stochastic", "none"), setting("bf16", "nearest", "none")]) == {"bf16": 1}
