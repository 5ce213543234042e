"""Hostile plans, PEFT configs, rule files and patterns through the real CLI (a subprocess
each): every case is refused with its exit code and one line, well within the time and
memory bounds, and leaves its inputs unchanged.

Covers values that once crashed (exit 70) or were silently accepted, YAML alias bombs
in a plan and in every field of a rule file, FIFOs and /dev/zero given as a plan, a
PEFT config or a rule file, catastrophic regexes from --targets / a plan / a PEFT
config, a local default.yaml that would switch the gate off, and a plan naming code
without --trust-plan-code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .harness import assert_refused, assert_unchanged, digest, run_cli

FACTORY = '''
import torch


def build():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
'''

# Ten aliases per level, nine levels: 10^9 nodes once expanded, a few hundred bytes.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-plans")
    (root / "factory.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_file(state, str(root / "net.safetensors"))
    state["0.weight"][0, 0] = float("nan")
    save_file(state, str(root / "nan.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file({"inputs": torch.randn(16, 8, generator=g), "targets": torch.randn(16, 4, generator=g)},
              str(root / "calib.safetensors"))
    return root


def _dynamic(work: Path) -> list[str]:
    return ["--model", f"{work / 'factory.py'}:build", "--calib", str(work / "calib.safetensors"),
            "--precision", "fp32", "--steps", "1", "--samples", "2", "-q"]


# --- values that crashed or were silently accepted ------------------------------------------

PLAN_VALUES = [
    ("steps: abc", "steps: expected an integer from 1 to 10000, got 'abc'"),
    ("steps: 2.5", "steps: expected an integer from 1 to 10000, got 2.5"),
    ("seed: 99999999999999999999", "seed: expected an integer from 0 to 9223372036854775807"),
    ("eval_batch: 0", "eval_batch: expected an integer from 1"),
    ("eval_batch: -1", "eval_batch: expected an integer from 1"),
    ("precision: []", "precision: expected a non-empty list"),
    ("rank: []", "rank: expected a non-empty list"),
    ("lr: abc", "lr: expected a finite number > 0, got 'abc'"),
    ("rank_pattern: [q_proj, 4]", "rank_pattern: expected a mapping"),
    ("rules: 3", "rules: expected a rule file name"),
    ("seed: " + "9" * 5000, "a value cannot be read"),
]


@pytest.mark.parametrize("line, needle", PLAN_VALUES, ids=[line[:24] for line, _ in PLAN_VALUES])
def test_plan_values_are_usage_errors(work: Path, tmp_path: Path, line: str, needle: str) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(line + "\n")
    before = digest([plan])
    outcome = run_cli([str(work / "net.safetensors"), "--plan", str(plan), *_dynamic(work)])
    assert_refused(outcome, 2, needle=needle)
    assert "plan.yaml" in outcome.stderr
    assert_unchanged(before, [plan])


PEFT_VALUES = [
    ({"lora_alpha": "abc"}, "lora_alpha: expected a finite number > 0, got 'abc'"),
    ({"lora_alpha": [16]}, "lora_alpha: expected a finite number > 0"),
    ({"target_modules": 3}, "target_modules: expected a non-empty list"),
    ({"rank_pattern": ["net.0", 4]}, "rank_pattern: expected a mapping"),
    ({"use_dora": True}, "use_dora: True cannot be honoured"),
]


@pytest.mark.parametrize("cfg, needle", PEFT_VALUES, ids=[next(iter(c)) for c, _ in PEFT_VALUES])
def test_peft_values_are_usage_errors(work: Path, tmp_path: Path, cfg: dict, needle: str) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["0"], **cfg}))
    outcome = run_cli([str(work / "net.safetensors"), "--peft-config", str(path), *_dynamic(work)])
    assert_refused(outcome, 2, needle=needle)
    assert "adapter_config.json" in outcome.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--rank", "4"], "--rank is for the dynamic audit"),
        (["--steps", "3"], "--steps is for the dynamic audit"),
        (["--lr", "1e-4,1e-3"], "the static audit uses one learning rate"),
        (["--rules", "strict.yaml", "--no-rules"], "--no-rules and --rules contradict"),
    ],
)
def test_flags_that_would_do_nothing(work: Path, args: list[str], needle: str) -> None:
    assert_refused(run_cli([str(work / "net.safetensors"), "-q", *args]), 2, needle=needle)


# --- bounded parsing ----------------------------------------------------------------------


def _rule_bomb(field: str) -> str:
    rule = {"id": "x", "scope": "layer", "when": "psi < 0.5", "severity": "error", "verdict": "ok", "message": "m"}
    lines = [f"    {key}: {'*i' if key == field else json.dumps(value)}" for key, value in rule.items()]
    text = BOMB + "rules:\n  -" + "\n".join(lines)[3:] + "\n"
    return text + (f"{field}: *i\n" if field in ("vars", "disable") else "")


@pytest.mark.parametrize("field", ["when", "disable"])  # every field: tests/test_plan.py, in-process
def test_alias_bomb_in_a_rule_file(work: Path, tmp_path: Path, field: str) -> None:
    rules = tmp_path / "bomb.yaml"
    rules.write_text(_rule_bomb(field))
    outcome = run_cli([str(work / "net.safetensors"), "--rules", str(rules), "-q"])
    assert_refused(outcome, 4, needle="expands to more than 100000 YAML nodes")


def test_alias_bomb_in_a_plan(work: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(BOMB + "".join(f"{key}: *i\n" for key in ("precision", "targets", "rank_pattern", "calib", "device")))
    outcome = run_cli([str(work / "net.safetensors"), "--plan", str(plan), "-q"])
    assert_refused(outcome, 2, needle="expands to more than 100000 YAML nodes")


@pytest.mark.parametrize("option, code", [("--plan", 2), ("--peft-config", 2), ("--rules", 4)])
@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_fifo_and_devices_are_not_read(work: Path, tmp_path: Path, option: str, code: int, special: str) -> None:
    if special == "fifo":
        path = tmp_path / "input.yaml"
        os.mkfifo(path)  # nobody writes to it: reading it would block forever
    else:
        path = Path(special)
    extra = _dynamic(work) if option == "--peft-config" else ["-q"]
    outcome = run_cli([str(work / "net.safetensors"), option, str(path), *extra], timeout=60)
    assert_refused(outcome, code, needle="FIFO" if special == "fifo" else "device")


# --- regular expressions ------------------------------------------------------------------

@pytest.mark.parametrize(  # more shapes: tests/test_plan.py, in-process
    "source, pattern", [("flag", "(a+)+$"), ("plan", "(.*a){20}"), ("peft", r"\w*\w*\w*\w*!"), ("peft", "(a|aa)*")]
)
def test_catastrophic_patterns_are_refused(work: Path, tmp_path: Path, pattern: str, source: str) -> None:
    args = [str(work / "net.safetensors"), *_dynamic(work)]
    if source == "flag":
        args += ["--rank", "2", "--targets", pattern]
    elif source == "plan":
        plan = tmp_path / "plan.yaml"
        plan.write_text(json.dumps({"rank": 2, "targets": pattern, "rank_pattern": {"0": 2}}))
        args += ["--plan", str(plan)]
    else:
        cfg = tmp_path / "adapter_config.json"
        cfg.write_text(json.dumps({"r": 2, "target_modules": pattern}))
        args += ["--peft-config", str(cfg)]
    assert_refused(run_cli(args, timeout=60), 2, needle="refused")


# --- bundled rule names and the trust boundary ------------------------------------------------


def test_a_local_default_yaml_cannot_switch_the_gate_off(work: Path, tmp_path: Path) -> None:
    (tmp_path / "default.yaml").write_text("rules: []\n")  # would pass every checkpoint
    (tmp_path / "strict.yaml").write_text("rules: []\n")
    before = digest([tmp_path])
    for args in ([], ["--rules", "default.yaml"], ["--rules", "default"], ["--rules", "strict.yaml"]):
        outcome = run_cli([str(work / "nan.safetensors"), "-q", *args], cwd=tmp_path)
        assert outcome.code == 1, (args, outcome.stderr)  # the bundled rules: non-finite weights fail the gate
        assert "Traceback" not in outcome.stderr
    named = run_cli([str(work / "nan.safetensors"), "-q", "--rules", "./default.yaml"], cwd=tmp_path)
    assert named.code == 0, named.stderr  # the local file, named as a path
    assert_unchanged(before, [tmp_path])


def test_plan_naming_code_needs_the_trust_flag(work: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"calib: {work / 'calib.safetensors'}\nmodel: os:system\n")
    outcome = run_cli([str(work / "net.safetensors"), "--plan", str(plan), "-q"])
    assert_refused(outcome, 2, needle="--trust-plan-code")
    assert "os:system" in outcome.stderr and "names code" in outcome.stderr
