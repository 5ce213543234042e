"""Evaluating rules on subjects: fired / passed / skipped, per-setting dedup, messages, gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hallway_audit.errors import UsageError
from hallway_audit.rules import (
    SEVERITIES,
    Outcome,
    Rule,
    RuleSet,
    Subject,
    evaluate,
    gate,
    load_rules,
    loads_rules,
    summarize,
)

RULES = """\
vars:
  stuck_error: 0.1
rules:
  - id: nan-weights
    scope: layer
    when: nonfinite > 0
    severity: error
    verdict: fix_weights
    message: "{layer}: {nonfinite} NaN/Inf weights"
  - id: stuck
    scope: layer
    when: beta_pred < stuck_error
    severity: error
    verdict: needs_finer_precision
    message: "at lr {lr:g} in {format}, only {beta_pred:.1%} of the weights of {layer} can move [{rule}]"
  - id: low-psi
    scope: layer
    when: psi < 0.9
    severity: warning
    verdict: needs_higher_rank
    message: "{layer}: psi {psi:.0%}"
  - id: ratio
    scope: layer
    when: saturated / flushed > 1
    severity: info
    verdict: check_range
    message: "{layer} ({setting}): ratio"
  - id: open-field
    scope: model
    when: p_t_lo <= 0.5
    severity: warning
    verdict: open_field
    message: "p_t = {p_t:.2f} [{p_t_lo:.2f}, {p_t_hi:.2f}]"
  - id: plan
    scope: setting
    when: bits < 8
    severity: info
    verdict: ok
    message: "{setting}: {bits} bits"
"""


@pytest.fixture(scope="module")
def rs() -> RuleSet:
    return loads_rules(RULES, name="test.yaml")


def layer(name: str, setting: str | None = None, **metrics: object) -> Subject:
    return Subject("layer", setting, name, metrics)  # type: ignore[arg-type]


def by_rule(outcomes: list[Outcome], rule_id: str) -> list[Outcome]:
    return [o for o in outcomes if o.rule.id == rule_id]


def test_fired_passed_and_message_with_format_specs(rs: RuleSet) -> None:
    subjects = [
        layer("l0", "bf16", beta_pred=0.03, lr=1e-5, format="bf16"),
        layer("l1", "bf16", beta_pred=0.6, lr=1e-5, format="bf16"),
    ]
    out = by_rule(evaluate(rs, subjects), "stuck")
    assert [o.status for o in out] == ["fired", "passed"]
    assert out[0].message == "at lr 1e-05 in bf16, only 3.0% of the weights of l0 can move [stuck]"
    assert out[1].message == ""
    assert out[0].subject.layer == "l0" and out[0].severity == "error"


def test_skipped_when_absent_none_or_nan(rs: RuleSet) -> None:
    subjects = [
        layer("absent", "bf16", lr=1e-5, format="bf16"),
        layer("none", "bf16", beta_pred=None, lr=1e-5, format="bf16"),
        layer("nan", "bf16", beta_pred=float("nan"), lr=1e-5, format="bf16"),
        layer("npnan", "bf16", beta_pred=np.float32("nan"), lr=1e-5, format="bf16"),
        layer("noformat", "bf16", beta_pred=0.01, lr=1e-5),
    ]
    out = by_rule(evaluate(rs, subjects), "stuck")
    assert [o.status for o in out] == ["skipped"] * 5
    assert out[0].message == "not measured: beta_pred"
    assert out[2].message == "not measured: beta_pred"
    assert out[4].message == "not measured: format"


def test_missing_metrics_listed_in_order(rs: RuleSet) -> None:
    [o] = by_rule(evaluate(rs, [Subject("model", "s", None, {"p_t_hi": 0.9})]), "open-field")
    assert o.status == "skipped" and o.message == "not measured: p_t_lo, p_t"


def test_numpy_and_inf_values(rs: RuleSet) -> None:
    subjects = [
        layer("a", "fp8", beta_pred=np.float32(0.05), lr=np.float64(1e-4), format="fp8"),
        layer("b", None, nonfinite=np.int64(3)),
        layer("c", "fp8", psi=math.inf),
    ]
    out = evaluate(rs, subjects)
    [stuck] = [o for o in by_rule(out, "stuck") if o.subject.layer == "a"]
    assert stuck.status == "fired" and "only 5.0%" in stuck.message
    [nan] = by_rule(out, "nan-weights")
    assert nan.status == "fired" and nan.message == "b: 3 NaN/Inf weights"
    [psi] = [o for o in by_rule(out, "low-psi") if o.subject.layer == "c"]
    assert psi.status == "passed"


def test_runtime_error_is_skipped_with_reason(rs: RuleSet) -> None:
    subjects = [layer("l0", "int4", saturated=0.1, flushed=0.0), layer("l1", "int4", saturated=0.1, flushed=0.01)]
    out = by_rule(evaluate(rs, subjects), "ratio")
    assert out[0].status == "skipped" and out[0].message == "cannot evaluate: division by zero"
    assert out[1].status == "fired" and out[1].message == "l1 (int4): ratio"


def test_per_setting_dedup(rs: RuleSet) -> None:
    """A setting-independent rule runs once per layer; a per-setting one once per (layer, setting)."""
    subjects = []
    for name in ("l0", "l1"):
        subjects.append(layer(name, None, nonfinite=2, params=10))
        subjects += [layer(name, fmt, beta_pred=0.01, lr=1e-5, format=fmt, nonfinite=2) for fmt in ("bf16", "fp8_e4m3", "int4")]
    out = evaluate(rs, subjects)
    nan = by_rule(out, "nan-weights")
    assert [(o.subject.layer, o.subject.setting, o.status) for o in nan] == [("l0", None, "fired"), ("l1", None, "fired")]
    stuck = by_rule(out, "stuck")
    assert len(stuck) == 6 and all(o.subject.setting is not None and o.status == "fired" for o in stuck)
    assert not rs.get("nan-weights").per_setting and rs.get("stuck").per_setting  # type: ignore[union-attr]


def test_scope_filtering_and_setting_scope(rs: RuleSet) -> None:
    subjects = [
        Subject("setting", "fp4", None, {"bits": 4, "format": "fp4_e2m1"}),
        Subject("setting", "bf16", None, {"bits": 16, "format": "bf16"}),
        Subject("model", "fp4", None, {"p_t": 0.4, "p_t_lo": 0.3, "p_t_hi": 0.5}),
    ]
    out = evaluate(rs, subjects)
    assert [o.status for o in by_rule(out, "plan")] == ["fired", "passed"]
    assert by_rule(out, "plan")[0].message == "fp4: 4 bits"
    [of] = by_rule(out, "open-field")
    assert of.status == "fired" and of.message == "p_t = 0.40 [0.30, 0.50]"
    assert rs.get("plan").per_setting  # type: ignore[union-attr]


def test_rule_without_subjects_gets_one_skipped_outcome(rs: RuleSet) -> None:
    out = evaluate(rs, [layer("l0", None, nonfinite=0)])
    [of] = by_rule(out, "open-field")
    assert of.status == "skipped" and of.subject.layer is None and "no model subject per setting" in of.message
    assert by_rule(out, "nan-weights")[0].status == "passed"
    assert len(out) == len(rs.rules)


def test_summarize(rs: RuleSet) -> None:
    subjects = [
        layer("l0", "bf16", beta_pred=0.01, lr=1e-5, format="bf16"),
        layer("l1", "bf16", beta_pred=0.9, lr=1e-5, format="bf16"),
        layer("l2", "bf16", lr=1e-5, format="bf16"),
    ]
    summary = summarize(evaluate(rs, subjects))
    assert list(summary) == [r.id for r in rs.rules]
    assert summary["stuck"] == {"fired": 1, "passed": 1, "skipped": 1}
    assert summary["open-field"] == {"fired": 0, "passed": 0, "skipped": 1}


def test_gate_for_each_fail_on(rs: RuleSet) -> None:
    warn_only = evaluate(rs, [layer("l0", "bf16", psi=0.5)])
    assert gate(warn_only, "error") is True
    assert gate(warn_only, "warning") is False
    assert gate(warn_only, "never") is True
    err = evaluate(rs, [layer("l0", None, nonfinite=1)])
    assert gate(err, "error") is False and gate(err, "warning") is False and gate(err, "never") is True
    info_only = evaluate(rs, [Subject("setting", "fp4", None, {"bits": 4, "format": "fp4"})])
    assert gate(info_only, "warning") is True
    # skipped outcomes never fail the gate
    skipped = evaluate(rs, [])
    assert all(o.status == "skipped" for o in skipped) and gate(skipped, "warning") is True
    assert gate([], "error") is True
    with pytest.raises(UsageError):
        gate(err, "fatal")
    assert SEVERITIES == ("error", "warning", "info")


def test_default_yaml_static_run() -> None:
    """The headline static finding, and dynamic rules skipped in a static-only run."""
    rs = load_rules(["default.yaml"])
    common = {"lr": 1e-5, "format": "bf16", "bits": 16, "rounds_stored": 1, "probed": 0}
    subjects = [
        Subject("layer", None, "model.layers.0.mlp", {"params": 100, "nonfinite": 0, "nonfinite_frac": 0.0}),
        Subject("layer", "bf16", "model.layers.0.mlp", {**common, "beta_pred": 0.03, "saturated": 0.0,
                                                         "flushed": 0.0, "sqnr_db": 50.0, "rel_error": 0.003}),
        Subject("model", None, None, {"params": 100, "nonfinite": 0, "nonfinite_frac": 0.0}),
        Subject("model", "bf16", None, {**common, "beta_pred": 0.03}),
    ]
    out = evaluate(rs, subjects)
    s = summarize(out)
    [stuck] = by_rule(out, "weights-cannot-move")
    assert stuck.status == "fired"
    assert stuck.message.startswith("at lr 1e-05 in bf16, only 3.0% of the weights of model.layers.0.mlp can move")
    assert s["weights-mostly-stuck"]["passed"] == 1  # the chained comparison excludes the error band
    assert s["nonfinite-weights"] == {"fired": 0, "passed": 1, "skipped": 0}
    assert s["quantization-noise"]["passed"] == 1
    assert s["model-weights-cannot-move"]["fired"] == 1
    for rule in rs:
        if rule.phase == "dynamic":
            assert s[rule.id]["fired"] == s[rule.id]["passed"] == 0
            assert all(o.message.startswith("not measured") for o in by_rule(out, rule.id))
    # The static prediction is a warning in default.yaml (master weights are unknown
    # statically) and an error in strict.yaml.
    assert stuck.rule.severity == "warning"
    assert gate(out, "error") is True and gate(out, "warning") is False
    strict = evaluate(load_rules(["strict.yaml"]), subjects)
    assert gate(strict, "error") is False
    # A probe burst that ran the format measures what beta_pred estimates: default.yaml's
    # static "cannot move" rules pass (the burst's forecast speaks), strict.yaml's still gates.
    probed = [Subject(x.scope, x.setting, x.layer, {**x.metrics, "probed": 1}) if x.setting else x for x in subjects]
    quiet = summarize(evaluate(rs, probed))
    assert all(quiet[r]["fired"] == 0 for r in ("weights-cannot-move", "weights-mostly-stuck", "model-weights-cannot-move"))
    assert gate(evaluate(load_rules(["strict.yaml"]), probed), "error") is False


def test_default_yaml_dynamic_messages() -> None:
    rs = load_rules(["default.yaml"])
    run = {"lr": 1e-4, "format": "bf16", "train_steps": 1000, "lora": 1}
    subjects = [
        Subject("layer", "lora16", "attn.q", {**run, "psi_rank": 0.62, "r_star": 48, "rank": 16, "beta_run": 0.0,
                                               "grad_share": 0.4}),
        Subject("layer", "lora16", "norm", {**run, "psi_rank": 1.0, "r_star": 1, "rank": 16, "beta_run": 0.0,
                                             "grad_share": 0.001}),
        Subject("model", "lora16", None, {**run, "psi": 0.95, "psi_rank": 0.95, "beta": 0.2, "beta_eff": 0.5,
                                          "p_t": 0.71, "p_t_lo": 0.6, "p_t_hi": 0.8, "p_t_val": 0.4, "score": 0.3, "score_growth": 0.3,
                                          "progress": 0.02, "progress_lo": 0.01, "progress_hi": 0.03, "beta_run": 0.6,
                                          "run_moving": 0.3, "run_realized": 0.6, "stall_step": 300, "stall_lr": 2e-5}),
    ]
    out = evaluate(rs, subjects)
    [rank] = by_rule(out, "gradient-escapes-rank")[:1]
    assert rank.message == "attn.q: rank 16 captures 62.0% of the layer's gradient; rank 48 would capture 90%"
    # a layer that carries the gradient and cannot move is a warning; a tiny one only advice
    assert [o.status for o in by_rule(out, "layer-cannot-move")] == ["fired", "passed"]
    assert [o.status for o in by_rule(out, "small-layer-cannot-move")] == ["passed", "fired"]
    assert by_rule(out, "small-layer-cannot-move")[1].rule.severity == "info"
    # the run stalls in its decay: a warning (it trains, its tail does little) naming the step and the lr
    [stall] = by_rule(out, "run-stalls-in-decay")
    assert stall.status == "fired" and "step 300 of 1000" in stall.message and "2e-05" in stall.message
    assert stall.rule.severity == "warning" and "60%" in stall.message
    assert by_rule(out, "weights-do-not-cross-cells")[0].status == "passed"
    assert by_rule(out, "loss-does-not-drop")[0].status == "passed"
    assert by_rule(out, "setting-trains")[0].status == "fired"
    assert by_rule(out, "hallway-does-not-generalize")[0].status == "fired"
    assert by_rule(out, "open-field")[0].status == "passed"


def test_hand_built_rule_derives_fields_and_is_hashable() -> None:
    r = Rule(id="x", scope="layer", when="psi < 0.9 and format == 'bf16'", severity="warning",
             verdict="needs_higher_rank", message="{layer} {r_star}")
    assert r.names == frozenset({"psi", "r_star"}) and r.per_setting and r.phase == "dynamic"
    assert r.required == ("psi", "format", "r_star")
    static = Rule(id="y", scope="layer", when="nonfinite > 0", severity="error", verdict="fix_weights", message="{layer}")
    assert not static.per_setting and static.phase == "static"
    o = Outcome(static, Subject("layer", None, "l", {"nonfinite": 1}), "fired", "l")
    assert len({r, static, o}) == 3
    with pytest.raises(Exception, match="scope must be one of"):
        Rule(id="z", scope="lyr", when="x > 0", severity="error", verdict="ok", message="")  # type: ignore[arg-type]


def test_message_rendering_never_raises() -> None:
    rs = loads_rules(
        "rules:\n  - id: r\n    scope: layer\n    when: nonfinite >= 0\n    severity: info\n    verdict: ok\n"
        '    message: "{nonfinite:.1%} {{literal}} {layer:>6}"\n'
    )
    [o] = evaluate(rs, [layer("l", None, nonfinite=2)])
    assert o.message == "200.0% {literal}      l"
    rs2 = loads_rules(
        "rules:\n  - id: r\n    scope: layer\n    when: nonfinite >= 0\n    severity: info\n    verdict: ok\n"
        '    message: "{nonfinite:d}"\n'
    )
    [o2] = evaluate(rs2, [layer("l", None, nonfinite=2.5)])  # a float where the spec wants an int
    assert o2.message == "2.5"


def test_subject_rejects_bad_scope() -> None:
    with pytest.raises(ValueError):
        Subject("tensor", None, "x", {})


def test_a_loss_that_barely_moves_fails_and_one_that_rises_warns() -> None:
    """On the validation suite a burst whose loss spiked then trained best: a rise is a
    warning, a loss that does not move is the error."""
    rs = load_rules(["default.yaml"])
    run = {"lr": 1e-3, "format": "fp32", "train_steps": 200, "beta_run": 1.0, "run_moving": 1.0, "run_realized": 1.0,
           "lora": 0}
    cases = {"flat": (0.004, 0.0001), "rising": (-11.3, -11.3), "dropping": (0.7, 0.05)}
    subjects = [Subject("model", name, None, {**run, "score": score, "score_growth": score, "progress": progress,
                                              "progress_lo": None, "progress_hi": None})
                for name, (score, progress) in cases.items()]
    out = evaluate(rs, subjects)
    fired = {(o.rule.id, o.subject.setting) for o in out if o.status == "fired"}
    assert ("loss-does-not-drop", "flat") in fired and ("loss-rises", "flat") not in fired
    assert ("loss-rises", "rising") in fired and ("loss-does-not-drop", "rising") not in fired
    assert not {r for r, s in fired if s == "dropping"} - {"setting-trains"}
    assert by_rule(out, "loss-rises")[1].rule.severity == "warning"


def test_lora_settings_have_their_own_score_floor() -> None:
    """Adapters start at B = 0 and a LoRA burst drops the loss less: the suite put LoRA's
    floor at progress_min_lora (1.5%), full fine-tuning's at progress_min (8%), both on the
    ranking score. score_growth (LoRA's growth carried through the run) gates nothing: on
    the held-out GPT-2, r4 at lr 1e-4 scored 0.011 with a growth bound of 0.016 and stayed
    stuck (0.004 over 200 steps)."""
    rs = load_rules(["default.yaml"])
    assert rs.vars["progress_min_lora"] < rs.vars["progress_min"]
    run = {"lr": 1e-4, "format": "bf16", "train_steps": 200, "beta_run": 1.0, "run_moving": 1.0, "run_realized": 1.0,
           "progress_lo": None, "progress_hi": None}
    # (kind, score_growth, score)
    cases = {("lora", 0.05, 0.03): 1, ("full", 0.03, 0.03): 0, ("lora", 0.0162, 0.0113): 1, ("full", 0.2, 0.2): 0}
    subjects = [Subject("model", f"{kind}-{score}", None, {**run, "lora": lora, "score": score, "score_growth": growth,
                                                          "progress": score / 10})
                for (kind, growth, score), lora in cases.items()]
    out = evaluate(rs, subjects)
    stuck = {o.subject.setting: o.status for o in by_rule(out, "loss-does-not-drop")}
    trains = {o.subject.setting: o.status for o in by_rule(out, "setting-trains")}
    assert stuck == {"lora-0.03": "passed", "full-0.03": "fired", "lora-0.0113": "fired", "full-0.2": "passed"}
    assert trains == {"lora-0.03": "fired", "full-0.03": "passed", "lora-0.0113": "passed", "full-0.2": "fired"}


def test_few_crossing_weights_warn_and_the_loss_decides() -> None:
    """all-MiniLM-L6-v2 in bf16 without master weights at lr 1e-5 forecast 3.0% of its
    weights crossing a cell, and trained (the burst lowered the loss 6.7%): a low beta_run
    with a dropping loss passes default.yaml with a warning; with a flat loss
    loss-does-not-drop fails it; strict.yaml refuses both."""
    run = {"lr": 1e-5, "format": "bf16", "train_steps": 200, "run_moving": 1.0, "run_realized": 1.0, "lora": 0,
           "beta_run": 0.03, "progress_lo": None, "progress_hi": None}
    subjects = [Subject("model", "drops", None, {**run, "score": 0.35, "score_growth": 0.35, "progress": 0.067}),
                Subject("model", "flat", None, {**run, "score": 0.008, "score_growth": 0.008, "progress": 0.0013})]
    out = evaluate(load_rules(["default.yaml"]), subjects)
    crossing = {o.subject.setting: (o.status, o.rule.severity) for o in by_rule(out, "weights-do-not-cross-cells")}
    assert crossing == {"drops": ("fired", "warning"), "flat": ("fired", "warning")}
    errors = {o.subject.setting for o in out if o.status == "fired" and o.rule.severity == "error"}
    assert errors == {"flat"}
    assert {o.subject.setting: o.status for o in by_rule(out, "setting-trains")} == {"drops": "fired", "flat": "passed"}
    assert "3.0% of the weights" in by_rule(out, "weights-do-not-cross-cells")[0].message
    strict = evaluate(load_rules(["strict.yaml"]), subjects)
    assert {o.subject.setting for o in by_rule(strict, "weights-do-not-cross-cells")
            if o.status == "fired" and o.rule.severity == "error"} == {"drops", "flat"}
