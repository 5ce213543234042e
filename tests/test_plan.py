"""The plan of an audit run (hallway_audit.plan): the merge defaults < plan YAML < PEFT
config < explicit flags, the one validation layer, flags that would do nothing, the
trust boundary for code a plan names, audit()'s arguments, bounded file loading
(safe_load), safe regexes (safe_regex), bundled rule names, and a property test that
feeds hostile plan YAMLs and PEFT configs through the real CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hallway_audit import AuditPlan, DynamicPlan, audit, build_plan
from hallway_audit.cli import main
from hallway_audit.errors import ExitCode, RuleFileError, UsageError
from hallway_audit.plan import DEFAULTS, KEYS
from hallway_audit.probe import BurstOptions, SweepSpec
from hallway_audit.probe.plan import read_peft_config
from hallway_audit.probe.targets import parameter_universe, select_targets
from hallway_audit.rules import load_rules
from hallway_audit.safe_load import (
    MAX_DEPTH,
    FileProblem,
    load_json_text,
    load_yaml_text,
    read_regular_file,
)
from hallway_audit.safe_regex import MAX_NAME_CHARS, check_name, compile_pattern

FACTORY = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


def build():
    return Net()
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A factory (Linear 8->16, Linear 16->4), its checkpoint, a calibration batch, a NaN checkpoint."""
    root = tmp_path_factory.mktemp("plan")
    (root / "factory.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    state = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    save_file(state, str(root / "net.safetensors"))
    nan = dict(state)
    nan["net.0.weight"] = nan["net.0.weight"].clone()
    nan["net.0.weight"][0, 0] = float("nan")
    save_file(nan, str(root / "nan.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file({"inputs": torch.randn(16, 8, generator=g), "targets": torch.randn(16, 4, generator=g)},
              str(root / "calib.safetensors"))
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- merge precedence


def test_defaults_when_nothing_is_given():
    plan = build_plan({})
    assert plan == AuditPlan(device="auto")
    assert plan.rules == ("default.yaml",) and plan.formats == ("bf16", "fp8_e4m3") and plan.lr == 1e-4
    assert plan.dynamic is None


def test_plan_file_then_peft_config_then_flags(tmp_path):
    plan_file = write(tmp_path / "plan.yaml", "calib: c.safetensors\nrank: [8, 16]\nsteps: 3\nsamples: 5\n"
                                               "targets: attention\nalpha: 4\nfail_on: warning\n")
    peft = write(tmp_path / "adapter_config.json", json.dumps({"r": 2, "target_modules": ["q_proj"], "lora_alpha": 32}))
    only_plan = build_plan({}, plan_file)
    assert only_plan.dynamic is not None
    assert only_plan.dynamic.sweep.rank == [8, 16] and only_plan.dynamic.sweep.targets == "attention"
    assert only_plan.dynamic.burst.steps == 3 and only_plan.fail_on == "warning"
    assert only_plan.dynamic.burst.micro_batch == DEFAULTS["micro_batch"]  # untouched keys keep the default
    with_peft = build_plan({}, plan_file, peft)
    sweep = with_peft.dynamic.sweep  # type: ignore[union-attr]
    assert sweep.rank == [2] and sweep.alpha == 32.0 and sweep.targets == r"(^|\.)(q_proj)$"  # PEFT over the plan
    assert with_peft.dynamic.burst.steps == 3  # type: ignore[union-attr]  # the plan's, PEFT has no steps
    flags = build_plan({"rank": ["4"], "targets": "mlp", "steps": 1}, plan_file, peft)
    sweep = flags.dynamic.sweep  # type: ignore[union-attr]
    assert sweep.rank == [4] and sweep.targets == "mlp" and sweep.alpha == 32.0  # flags over both
    assert flags.dynamic.burst.steps == 1 and flags.dynamic.burst.samples == 5  # type: ignore[union-attr]


def test_dashes_and_underscores_and_comma_lists(tmp_path):
    plan_file = write(tmp_path / "plan.yaml", "calib: c\nmicro-batch: 4\nprecision: bf16, fp8_e4m3\nlr: [1.0e-3, 1e-4]\n")
    plan = build_plan({}, plan_file)
    assert plan.dynamic.burst.micro_batch == 4  # type: ignore[union-attr]
    assert plan.formats == ("bf16", "fp8_e4m3")
    assert plan.dynamic.sweep.lr == [1e-3, 1e-4] and plan.lr == 1e-3  # type: ignore[union-attr]  # YAML 1.1's '1e-4' string


def test_rules_choice_later_source_wins(tmp_path):
    no_rules = write(tmp_path / "a.yaml", "no_rules: true\n")
    with_rules = write(tmp_path / "b.yaml", "rules: [strict.yaml]\n")
    assert build_plan({}, no_rules).rules == ()
    assert build_plan({"rules": ["default.yaml"]}, no_rules).rules == ("default.yaml",)
    assert build_plan({}, with_rules).rules == ("strict.yaml",)
    assert build_plan({"no_rules": True}, with_rules).rules == ()
    assert build_plan({}, write(tmp_path / "c.yaml", "rules: strict.yaml\n")).rules == ("strict.yaml",)


# ----------------------------------------------------------------------------- the validation layer

BAD_VALUES = [
    ("steps", "abc", "expected an integer from 1 to 10000, got 'abc'"),
    ("steps", 2.5, "got 2.5"),
    ("steps", 0, "got 0"),
    ("steps", True, "got True"),
    ("steps", 20000, "HALLWAY_AUDIT_MAX_STEPS"),
    ("samples", 0, "samples"),
    ("samples", 10**6, "HALLWAY_AUDIT_MAX_SAMPLES"),
    ("seed", 99999999999999999999, "from 0 to 9223372036854775807"),
    ("seed", -1, "seed"),
    ("eval_batch", 0, "expected an integer from 1 to 65536, got 0"),
    ("eval_batch", -1, "got -1"),
    ("micro_batch", [8], "got [8]"),
    ("p_every", -1, "integer from 0 to 10000, got -1"),
    ("sigma", float("nan"), "finite number >= 0"),
    ("sigma", -0.5, "sigma"),
    ("lr", "abc", "finite number > 0, got 'abc'"),
    ("lr", 0, "lr"),
    ("lr", float("inf"), "lr"),
    ("lr", [], "non-empty list"),
    ("alpha", "abc", "alpha"),
    ("alpha", [1], "alpha"),
    ("alpha", 0, "alpha"),
    ("rank", [], "non-empty list"),
    ("rank", "abc", "rank"),
    ("rank", -1, "rank"),
    ("rank", True, "rank"),
    ("rank", {"a": 1}, "rank"),
    ("precision", [], "non-empty list"),
    ("precision", [8], "format name"),
    ("precision", "fp7", "fp7"),
    ("precision", [[1]], "no nested lists"),
    ("rounding", ["floor"], "nearest, stochastic"),
    ("optimizer", "lion", "adamw, sgd"),
    ("rslora", "yes", "true or false"),
    ("spectral", 1, "true or false"),
    ("per_layer_p", None, "true or false"),
    ("rules", 3, "rule file"),
    ("rules", [], "rule file"),
    ("rules", [1], "rule file names"),
    ("rank_pattern", [1, 2], "mapping"),
    ("rank_pattern", {"q_proj": 0}, "q_proj"),
    ("rank_pattern", {"(a+)+": 4}, "refused"),
    ("targets", 3, "all-linear"),
    ("targets", "(a+)+", "refused"),
    ("targets", "([", "not a valid regular expression"),
    ("calib", 5, "path"),
    ("calib", "a\x00b", "path"),
    ("device", "", "device"),
    ("fail_on", "sometimes", "error, warning, never"),
    ("sparsity", ["1.5"], "[0, 1)"),
    ("sparsity", [float("nan")], "fraction"),
    ("max_length", 0, "max_length"),
]


@pytest.mark.parametrize("key, value, needle", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_plan_values_name_the_file_and_key(tmp_path, key, value, needle):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"calib": "c.safetensors", key: value}), encoding="utf-8")
    with pytest.raises(UsageError) as exc:
        build_plan({}, plan_file)
    message = exc.value.message
    assert message.startswith(f"{plan_file}: {key}:"), message
    assert needle in message, message
    assert "\n" not in message
    assert exc.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("key, value, needle", BAD_VALUES[:20], ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES[:20]])
def test_bad_flag_values_name_the_flag(key, value, needle):
    with pytest.raises(UsageError) as exc:
        build_plan({"calib": "c.safetensors", key: value})
    assert exc.value.message.startswith(f"--{key.replace('_', '-')}:"), exc.value.message
    assert needle in exc.value.message


def test_a_limit_is_raised_with_its_environment_variable(monkeypatch):
    with pytest.raises(UsageError, match="HALLWAY_AUDIT_MAX_STEPS"):
        build_plan({"calib": "c", "steps": 20000})
    monkeypatch.setenv("HALLWAY_AUDIT_MAX_STEPS", "20000")
    assert build_plan({"calib": "c", "steps": 20000}).dynamic.burst.steps == 20000  # type: ignore[union-attr]
    monkeypatch.setenv("HALLWAY_AUDIT_MAX_STEPS", "many")
    with pytest.raises(UsageError, match="HALLWAY_AUDIT_MAX_STEPS='many' is not a whole number"):
        build_plan({"calib": "c", "steps": 2})


def test_the_grid_size_is_bounded(tmp_path):
    plan_file = write(tmp_path / "plan.yaml", "calib: c\nrank: [" + ", ".join(str(r) for r in range(1, 65)) + "]\n"
                      "lr: [" + ", ".join(f"{i}.0e-4" for i in range(1, 33)) + "]\n")
    with pytest.raises(UsageError, match=r"rank: the lists make 4096 settings, more than the limit of 1024 .*HALLWAY_AUDIT_MAX_SETTINGS"):
        build_plan({}, plan_file)


def test_unknown_and_non_string_keys(tmp_path):
    with pytest.raises(UsageError, match=r"unknown plan key 'rnak' \(did you mean 'rank'\?\)"):
        build_plan({}, write(tmp_path / "a.yaml", "rnak: 4\n"))
    with pytest.raises(UsageError, match="plan keys are strings, got 1"):
        build_plan({}, write(tmp_path / "b.yaml", "1: 4\n"))
    with pytest.raises(UsageError, match="given twice"):
        build_plan({}, write(tmp_path / "c.yaml", "calib: c\nmicro_batch: 4\nmicro-batch: 8\n"))
    with pytest.raises(UsageError, match="a plan is a mapping"):
        build_plan({}, write(tmp_path / "d.yaml", "- 1\n- 2\n"))


def test_every_key_has_a_checker_and_a_cli_flag():
    from hallway_audit.cli.audit_cmd import _PLAN_PARAMS

    assert set(_PLAN_PARAMS.values()) == set(KEYS) - {"rank_pattern"}  # rank_pattern: plan and PEFT only


# ----------------------------------------------------------------------------- flags that would do nothing


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"rank": ["4"]}, "--rank is for the dynamic audit (probe bursts): add --calib FILE"),
        ({"steps": 3}, "--steps is for the dynamic audit"),
        ({"seed": 1}, "--seed is for the dynamic audit"),
        ({"model": "m:f"}, "--model is for the dynamic audit"),
        ({"val": "v.pt"}, "--val is for the dynamic audit"),
        ({"no_early_stop": True}, "--no-early-stop is for the dynamic audit"),
        ({"lr": ["1e-4", "1e-3"]}, "--lr: the static audit uses one learning rate, got 2"),
        ({"rules": ["strict.yaml"], "no_rules": True}, "--no-rules and --rules contradict each other"),
    ],
)
def test_flags_that_would_do_nothing_are_usage_errors(flags, needle):
    with pytest.raises(UsageError) as exc:
        build_plan(flags)
    assert needle in exc.value.message


def test_plan_keys_that_would_do_nothing_name_the_file(tmp_path):
    with pytest.raises(UsageError, match=r"plan\.yaml: rank is for the dynamic audit .*calib: FILE"):
        build_plan({}, write(tmp_path / "plan.yaml", "rank: 8\n"))
    with pytest.raises(UsageError, match=r"plan\.yaml: rules and no_rules: true contradict each other"):
        build_plan({}, write(tmp_path / "plan.yaml", "rules: strict.yaml\nno_rules: true\n"))
    peft = write(tmp_path / "adapter_config.json", json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(UsageError, match=r"adapter_config\.json: r is for the dynamic audit"):
        build_plan({}, None, peft)
    assert build_plan({"calib": "c"}, None, peft).dynamic is not None


def test_rank_larger_than_a_targeted_layer_names_the_layer(work):
    args = (work / "net.safetensors", "--model", f"{work / 'factory.py'}:build", "--calib", work / "calib.safetensors",
            "--precision", "fp32", "--steps", "1", "--samples", "2", "-q", "--format", "json")
    code, out, err = run(*args, "--rank", "8")  # net.2 is 16 -> 4: min(in, out) = 4
    assert code == ExitCode.USAGE and out == ""
    assert "rank 8 is larger than layer net.2 can hold (4 x 16: min(in, out) = 4)" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(*args, "--rank", "8", "--targets", r"^net\.0$")  # only net.0 (16 x 8): fits
    assert code in (ExitCode.OK, ExitCode.GATE_FAILED), err


# ----------------------------------------------------------------------------- trust boundary


@pytest.mark.parametrize("key, value", [("model", "os:system"), ("loss", "os:system"), ("model", "evil.py:build")])
def test_plan_code_needs_trust(tmp_path, key, value):
    plan_file = write(tmp_path / "plan.yaml", yaml.safe_dump({"calib": "c.safetensors", key: value}))
    with pytest.raises(UsageError) as exc:
        build_plan({}, plan_file)
    assert exc.value.message.startswith(f"{plan_file}: {key}: {value!r} names code to import and run")
    assert "--trust-plan-code" in exc.value.message
    trusted = build_plan({}, plan_file, trust_code=True)
    assert getattr(trusted.dynamic, key) == value
    # the user's own command line needs no flag, and overrides the plan's value
    assert getattr(build_plan({key: "mine:fn"}, plan_file).dynamic, key) == "mine:fn"


def test_builtin_loss_names_need_no_trust(tmp_path):
    plan = build_plan({}, write(tmp_path / "plan.yaml", "calib: c\nloss: causal_lm\n"))
    assert plan.dynamic.loss == "causal_lm"  # type: ignore[union-attr]


def test_untrusted_plan_code_never_runs_through_the_cli(work, tmp_path):
    marker = tmp_path / "ran"
    evil = write(tmp_path / "evil.py", f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                                       "def build():\n    raise SystemExit(3)\n")
    plan_file = write(tmp_path / "plan.yaml", f"calib: {work / 'calib.safetensors'}\nmodel: {evil}:build\n")
    code, out, err = run(work / "net.safetensors", "--plan", plan_file, "-q")
    assert code == ExitCode.USAGE and "--trust-plan-code" in err and out == ""
    assert not marker.exists()


# ----------------------------------------------------------------------------- PEFT configs


def peft(tmp_path: Path, **cfg: object) -> Path:
    return write(tmp_path / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], **cfg}))


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"lora_alpha": "abc"}, "lora_alpha: expected a finite number > 0, got 'abc'"),
        ({"lora_alpha": [16]}, "lora_alpha"),
        ({"target_modules": 3}, "target_modules: expected a non-empty list"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": [1]}, "target_modules"),
        ({"target_modules": "(a+)+"}, "refused"),
        ({"rank_pattern": ["q_proj", 4]}, "rank_pattern: expected a mapping"),
        ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),
        ({"r": 0}, "r: expected an integer from 1"),
        ({"r": "8"}, None),  # a numeric string is a number
        ({"use_rslora": "true"}, "use_rslora: expected true or false"),
        ({"use_dora": True}, "use_dora: True cannot be honoured: DoRA"),
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"layers_to_transform": [0, 1]}, "layers_to_transform"),
        ({"bias": "all"}, "bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"some_future_key": {"a": 1}}, "some_future_key: {'a': 1} cannot be honoured"),
        ({"peft_type": "IA3"}, "IA3"),
    ],
)
def test_peft_values(tmp_path, cfg, needle):
    path = peft(tmp_path, **cfg)
    if needle is None:
        assert read_peft_config(path).values["rank"] == [8]
        return
    with pytest.raises(UsageError) as exc:
        read_peft_config(path)
    assert exc.value.message.startswith(str(path)), exc.value.message
    assert needle in exc.value.message, exc.value.message


def test_peft_keys_that_change_nothing_are_accepted(tmp_path):
    path = peft(tmp_path, task_type="CAUSAL_LM", lora_dropout=0.05, base_model_name_or_path="x", use_dora=False,
                alpha_pattern={}, modules_to_save=None, bias="none", init_lora_weights=True, layers_to_transform=None,
                inference_mode=True, fan_in_fan_out=False)
    got = read_peft_config(path)
    assert got.values["rank"] == [8] and "alpha" not in got.values


def test_peft_string_target_modules_is_a_full_match(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    params = parameter_universe(LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32)))
    targets = read_peft_config(peft(tmp_path, target_modules=r".*\.0\.self_attn\.q_proj")).values["targets"]
    assert {p.layer for p in select_targets(params, str(targets))} == {"model.layers.0.self_attn.q_proj"}
    targets = read_peft_config(peft(tmp_path, target_modules="q_proj")).values["targets"]
    with pytest.raises(UsageError, match="matches no linear layer"):  # PEFT full-matches: no module is named 'q_proj'
        select_targets(params, str(targets))


def test_peft_null_target_modules_needs_targets(tmp_path):
    path = write(tmp_path / "adapter_config.json", json.dumps({"r": 4, "target_modules": None}))
    with pytest.raises(UsageError, match="target_modules is null"):
        build_plan({"calib": "c"}, None, path)
    assert build_plan({"calib": "c", "targets": "mlp"}, None, path).dynamic.sweep.targets == "mlp"  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- audit() in Python


def test_audit_accepts_a_plan_and_checks_keyword_arguments(work):
    ckpt = work / "net.safetensors"
    plan = build_plan({"precision": ["bf16"], "fail_on": "never"})
    result = audit(ckpt, plan, device="cpu")
    assert result.static.formats == ["bf16"] and result.gate.fail_on == "never"
    result = audit(ckpt, plan, fail_on="error", device="cpu")  # a keyword argument overrides the plan
    assert result.gate.fail_on == "error"
    for kwargs, needle in [({"lr": 0.0}, "audit(): lr"), ({"formats": []}, "audit(): formats"),
                           ({"fail_on": "sometimes"}, "audit(): fail_on"), ({"spectral": "yes"}, "audit(): spectral")]:
        with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            audit(ckpt, **kwargs)


def test_audit_checks_a_dynamic_plan_built_in_python(work):
    bad = DynamicPlan(calib=str(work / "calib.safetensors"), model=f"{work / 'factory.py'}:build",
                      sweep=SweepSpec(precision=["fp32"], rank=[2]), burst=BurstOptions(steps=0))
    with pytest.raises(UsageError, match=r"audit\(\): dynamic\.burst\.steps: expected an integer from 1"):
        audit(work / "net.safetensors", dynamic=bad)
    bad = DynamicPlan(calib=str(work / "calib.safetensors"), sweep=SweepSpec(rank=[2], rank_pattern={"(a*)*": 4}))
    with pytest.raises(UsageError, match="refused"):
        audit(work / "net.safetensors", dynamic=bad)


def test_audit_plan_filled_by_hand_is_checked(work):
    with pytest.raises(UsageError, match=r"plan\.lr"):
        audit(work / "net.safetensors", AuditPlan(lr=float("nan"), device="cpu"))
    with pytest.raises(UsageError, match=r"plan\.master_weights: expected one of fp32, none, got 'fp16'"):
        audit(work / "net.safetensors", AuditPlan(master_weights=("fp16",), device="cpu"))
    with pytest.raises(UsageError, match=r"plan\.rounding: expected one of nearest, stochastic, got 'floor'"):
        audit(work / "net.safetensors", AuditPlan(rounding=("floor",), device="cpu"))
    with pytest.raises(UsageError, match="plan must be an AuditPlan"):
        audit(work / "net.safetensors", {"lr": 1e-4})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- bundled rule names


def test_a_local_default_yaml_does_not_replace_the_bundled_rules(work, tmp_path, monkeypatch):
    write(tmp_path / "default.yaml", "rules: []\n")  # would pass every checkpoint
    monkeypatch.chdir(tmp_path)
    result = audit(work / "nan.safetensors")
    assert not result.gate.passed  # the bundled default.yaml's nonfinite rule
    assert any("the bundled default.yaml was used" in n and "./default.yaml" in n for n in result.notes)
    assert audit(work / "nan.safetensors", rules=["./default.yaml"]).gate.passed  # named as a path: the local file


def test_verdict_of_the_wrong_type_is_a_rule_file_error(tmp_path):
    path = write(tmp_path / "r.yaml", "rules:\n  - id: x\n    scope: layer\n    when: psi < 0.5\n    severity: error\n"
                                      "    verdict: [needs_higher_rank]\n    message: m\n")
    with pytest.raises(RuleFileError, match="unknown verdict"):
        load_rules([path])


# ----------------------------------------------------------------------------- safe_load


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_alias_expansion_is_refused_before_construction(tmp_path):
    with pytest.raises(FileProblem, match="expands to more than 100000 YAML nodes"):
        load_yaml_text(BOMB)
    with pytest.raises(FileProblem, match="contains it"):
        load_yaml_text("a: &a [*a]\n")
    assert load_yaml_text("a: &a [1, 2]\nb: *a\n") == {"a": [1, 2], "b": [1, 2]}  # aliases within the limit are fine
    plan_file = write(tmp_path / "plan.yaml", BOMB + "precision: *i\n")
    with pytest.raises(UsageError, match=r"plan\.yaml: expands to more than"):
        build_plan({}, plan_file)


@pytest.mark.parametrize("field", ["vars", "when", "id", "scope", "severity", "disable"])
def test_alias_bomb_in_a_rule_file_is_a_rule_file_error(tmp_path, field):
    rule = {"id": "x", "scope": "layer", "when": "psi < 0.5", "severity": "error", "verdict": "ok", "message": "m"}
    lines = [f"    {key}: {'*i' if key == field else json.dumps(value)}" for key, value in rule.items()]
    text = BOMB + "rules:\n  -" + "\n".join(lines)[3:] + "\n"
    if field in ("vars", "disable"):
        text += f"{field}: *i\n"
    path = write(tmp_path / "bomb.yaml", text)
    with pytest.raises(RuleFileError, match="expands to more than 100000 YAML nodes"):
        load_rules([path])


def test_nesting_is_bounded():
    deep_yaml = "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    with pytest.raises(FileProblem, match="nested more than"):
        load_yaml_text(deep_yaml)
    with pytest.raises(FileProblem, match="nested more than"):
        load_json_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FileProblem, match="nested more than"):
        load_json_text("[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2))
    with pytest.raises(FileProblem, match="malformed YAML: a value cannot be read"):
        load_yaml_text("seed: " + "9" * 5000 + "\n")  # int() refuses more than 4300 digits
    with pytest.raises(FileProblem, match="not valid JSON"):
        load_json_text('{"r": ' + "9" * 5000 + "}")


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "FIFO"), (Path("/dev/zero"), "device"), (tmp_path, "directory")):
        with pytest.raises(FileProblem, match=kind):
            read_regular_file(path, what="plan file", limit=1 << 20, limit_env="X")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * 101)
    with pytest.raises(FileProblem, match=r"101 bytes, larger than the limit of 100 bytes for a plan file \(set X"):
        read_regular_file(big, what="plan file", limit=100, limit_env="X")
    assert read_regular_file(big, what="plan file", limit=101, limit_env="X") == b"#" * 101
    with pytest.raises(FileProblem, match="not found"):
        read_regular_file(tmp_path / "nope", what="plan file", limit=100, limit_env="X")


def test_plan_size_limit_comes_from_the_environment(tmp_path, monkeypatch):
    plan_file = write(tmp_path / "plan.yaml", "fail_on: error\n" + "#" * 200 + "\n")
    monkeypatch.setenv("HALLWAY_AUDIT_MAX_PLAN_BYTES", "100")
    with pytest.raises(UsageError, match="HALLWAY_AUDIT_MAX_PLAN_BYTES"):
        build_plan({}, plan_file)
    monkeypatch.setenv("HALLWAY_AUDIT_MAX_PLAN_BYTES", "1000")
    assert build_plan({}, plan_file).fail_on == "error"


# ----------------------------------------------------------------------------- safe_regex


@pytest.mark.parametrize("pattern", [r"(^|\.)(q_proj|v_proj)$", r".*\.(q_proj|v_proj)$", r"layers\.\d+\.self_attn\..*",
                                     r"^(?!.*lm_head).*$", r"decoder.*(SelfAttention|EncDecAttention).*[qv]$",
                                     r"\A(?:.*q_proj)\Z", "(a|b)*", r"layers\.[0-3]\.mlp"])
def test_ordinary_patterns_are_accepted(pattern):
    assert compile_pattern(pattern, "--targets").pattern == pattern


@pytest.mark.parametrize("pattern, needle", [
    ("(a+)+", "repeated group"), ("(a*)*", "repeated group"), ("(a|aa)*", "repeated group"), ("(.*a){20}", "repeated group"),
    (r"(\.\d+)*", "repeated group"), (r"\w*\w*\w*!", "backtrack"), (".*.*.*x", "backtrack"), ("a{1000}", "over 256"),
    (r"(a)\1", "backreferences"), ("x" * 5000, "more than 4096"), ("(", "not a valid regular expression"),
])
def test_catastrophic_patterns_are_refused(pattern, needle):
    with pytest.raises(UsageError) as exc:
        compile_pattern(pattern, "--targets")
    assert exc.value.message.startswith("--targets: ") and needle in exc.value.message


def test_long_module_names_are_not_matched():
    assert check_name("a" * MAX_NAME_CHARS, "--targets")
    with pytest.raises(UsageError, match="characters long"):
        check_name("a" * (MAX_NAME_CHARS + 1), "--targets")


# ----------------------------------------------------------------------------- hostile plans through the CLI

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["abc", "1e-4", "full", "all-linear", "(a+)+", "2:4", "nan", "-1", "0", "bf16", "default.yaml",
                     "os:system", "cuda", "never"]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)
_PLAN_KEYS = st.sampled_from([*sorted(KEYS), "rnak", "steps ", "micro-batch"])
_PEFT_KEYS = st.sampled_from(["r", "target_modules", "lora_alpha", "use_rslora", "rank_pattern", "use_dora",
                              "alpha_pattern", "modules_to_save", "bias", "lora_dropout", "peft_type", "zzz"])


def _dump(data: dict) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return "{}\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(plan=st.dictionaries(_PLAN_KEYS, _VALUES, max_size=5),
       peft_cfg=st.one_of(st.none(), st.dictionaries(_PEFT_KEYS, _VALUES, max_size=5)))
def test_hostile_plans_and_peft_configs_never_crash(work, tmp_path_factory, plan, peft_cfg):
    tmp = tmp_path_factory.mktemp("hostile")
    plan_file = write(tmp / "plan.yaml", _dump(plan))
    argv: list[object] = [work / "net.safetensors", "--plan", plan_file, "--model", f"{work / 'factory.py'}:build",
                          "--calib", work / "calib.safetensors", "--precision", "fp32", "--rank", "2",
                          "--lr", "1e-3", "--steps", "1", "--samples", "2", "--sparsity", "0", "--act-precision",
                          "none", "--rounding", "nearest", "--master-weights", "fp32", "--optimizer", "adamw",
                          "--device", "cpu", "-q", "--format", "json"]
    if peft_cfg is not None:
        argv += ["--peft-config", write(tmp / "adapter_config.json", json.dumps(peft_cfg))]
    code, _, err = run(*argv)
    assert code in (0, 1, 2, 4, 7, 8), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code not in (0, 1):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hallway-audit: error:"), err
