"""The command line as users and CI run it: exit codes, formats, clean stdout, no tracebacks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from helpers import EXAMPLE, tiny_mlp_state, write_rules, write_safetensors

from hallway_audit.cli import main
from hallway_audit.report import SCHEMA_VERSION

LENIENT = """
rules:
  - id: nan-weights
    scope: layer
    when: nonfinite > 0
    severity: error
    verdict: fix_weights
    message: "{layer} has {nonfinite} non-finite weights"
"""


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def mlp(tmp_path):
    return write_safetensors(tmp_path / "mlp.safetensors", tiny_mlp_state())


@pytest.fixture()
def nan_mlp(tmp_path):
    state = tiny_mlp_state()
    state["net.2.weight"][0, 0] = float("nan")
    return write_safetensors(tmp_path / "nan.safetensors", state)


def test_bundled_example_audits_with_default_rules(capsys):
    code, out, err = run(capsys, str(EXAMPLE), "--rules", "default.yaml")
    assert code in (0, 1)
    assert "hallway-audit" in out and "model.layers.0.mlp.down_proj" in out
    assert "Traceback" not in err
    assert "\x1b[" not in out  # not a TTY: plain text


def test_json_is_the_only_thing_on_stdout_and_matches_the_schema(capsys, mlp):
    code, out, _err = run(capsys, str(mlp), "--format", "json", "--precision", "bf16,fp8_e4m3", "--lr", "1e-5")
    doc = json.loads(out)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["tool"]["name"] == "hallway-audit"
    assert doc["checkpoint"] == {"path": str(mlp), "format": "safetensors", "tensors": 5, "params": 3216, "bytes": 3216 * 4}
    assert doc["static"]["formats"] == ["bf16", "fp8_e4m3"] and doc["static"]["lr"] == 1e-5
    layer = {entry["name"]: entry for entry in doc["static"]["layers"]}["net.0"]
    assert layer["params"] == 64 * 32 + 64
    assert set(layer["formats"]["bf16"]) >= {"rel_error", "sqnr_db", "saturated", "flushed", "beta_pred"}
    for f in doc["findings"]:
        assert set(f) == {"rule", "severity", "verdict", "scope", "layer", "setting", "message"}
    assert {k: doc["gate"][k] for k in ("passed", "fail_on", "exit_code")} == {"passed": code == 0, "fail_on": "error", "exit_code": code}


def test_exit_0_when_gate_passes_and_1_when_it_fails(capsys, tmp_path, mlp, nan_mlp):
    rules = write_rules(tmp_path / "r.yaml", LENIENT)
    assert run(capsys, str(mlp), "--rules", str(rules))[0] == 0
    code, out, _ = run(capsys, str(nan_mlp), "--rules", str(rules), "--format", "json")
    assert code == 1
    findings = json.loads(out)["findings"]
    assert [(f["rule"], f["layer"], f["setting"]) for f in findings] == [("nan-weights", "net.2", None)]
    assert run(capsys, str(nan_mlp), "--rules", str(rules), "--fail-on", "never")[0] == 0


def test_fail_on_warning_gates_on_warnings(capsys, tmp_path, mlp):
    rules = write_rules(tmp_path / "w.yaml", LENIENT.replace("nonfinite > 0", "params > 0").replace("error", "warning", 1))
    assert run(capsys, str(mlp), "--rules", str(rules))[0] == 0
    assert run(capsys, str(mlp), "--rules", str(rules), "--fail-on", "warning")[0] == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--precision", "fp7"], "unknown format 'fp7'"),
        (["--lr", "-1"], "--lr"),
        (["--fail-on", "sometimes"], "sometimes"),
        (["--format", "yaml"], "yaml"),
        (["--bogus-flag"], "bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, mlp, argv, needle):
    code, out, err = run(capsys, str(mlp), *argv)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert out == ""


def test_missing_checkpoint_exits_3(capsys, tmp_path):
    code, _out, err = run(capsys, str(tmp_path / "nope.safetensors"))
    assert code == 3 and "nope.safetensors" in err and len(err.strip().splitlines()) == 1


def test_corrupt_checkpoint_exits_3_and_is_untouched(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    before = hashlib.sha256(bad.read_bytes()).hexdigest()
    code, _, err = run(capsys, str(bad))
    assert code == 3 and "bad.safetensors" in err
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == before


def test_invalid_rule_file_exits_4_naming_file_and_line(capsys, tmp_path, mlp):
    rules = write_rules(tmp_path / "broken.yaml", LENIENT.replace("nonfinite > 0", "nonfinit > 0"))
    code, out, err = run(capsys, str(mlp), "--rules", str(rules))
    assert code == 4 and "broken.yaml" in err and "nan-weights" in err and "nonfinit" in err
    assert out == ""


def test_output_file_is_written_atomically_and_stdout_stays_empty(capsys, tmp_path, mlp):
    target = tmp_path / "report.json"
    code, out, _err = run(capsys, str(mlp), "--format", "json", "--output", str(target))
    assert out == ""
    assert json.loads(target.read_text())["gate"]["exit_code"] == code
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []  # no temp file left


def test_output_into_missing_directory_exits_5(capsys, tmp_path, mlp):
    code, _, err = run(capsys, str(mlp), "--format", "json", "--output", str(tmp_path / "no" / "r.json"))
    assert code == 5 and "does not exist" in err


def test_markdown_and_junit_reports(capsys, tmp_path, nan_mlp):
    rules = write_rules(tmp_path / "r.yaml", LENIENT)
    code, md, _ = run(capsys, str(nan_mlp), "--rules", str(rules), "--format", "markdown")
    assert code == 1 and "## hallway-audit: gate failed" in md and "| `nan-weights` |" in md.replace(" ❌ ", " ")
    code, xml, _ = run(capsys, str(nan_mlp), "--rules", str(rules), "--format", "junit")
    root = ET.fromstring(xml)
    assert root.get("failures") == "1" and int(root.get("tests")) == 3  # one case per layer
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == ["net.2"]


def test_dynamic_rules_are_reported_skipped_not_passed(capsys, mlp):
    _code, out, _ = run(capsys, str(mlp), "--format", "json")
    summary = {r["id"]: r for r in json.loads(out)["rules"]["summary"]}
    dynamic = [r for r in summary.values() if r["phase"] == "dynamic"]
    assert dynamic, "default.yaml carries the dynamic practitioner rule"
    for r in dynamic:
        assert r["passed"] == 0 and r["fired"] == 0 and r["skipped"] > 0


def test_same_command_twice_gives_identical_json(capsys, mlp):
    first = run(capsys, str(mlp), "--format", "json", "--spectral")[1]
    second = run(capsys, str(mlp), "--format", "json", "--spectral")[1]
    assert first == second


def test_formats_and_rules_subcommands(capsys):
    code, out, _ = run(capsys, "formats", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["fp8_e4m3"]["max_finite"] == 448 and rows["bf16"]["ulp_at_1"] == 2.0**-7
    code, out, _ = run(capsys, "rules", "list")
    assert code == 0 and "default.yaml" in out
    code, out, _ = run(capsys, "rules", "validate", "default.yaml")
    assert code == 0


def test_rules_validate_reports_every_problem(capsys, tmp_path):
    bad = write_rules(tmp_path / "bad.yaml", LENIENT.replace("error", "fatal").replace("fix_weights", "fix_it"))
    code, _, err = run(capsys, "rules", "validate", str(bad))
    assert code == 4 and "fatal" in err and "fix_it" in err


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "Exit codes" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "hallway-audit" in out


def test_console_script_and_module_entry_points(mlp):
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "hallway_audit", str(mlp), "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode in (0, 1) and json.loads(proc.stdout)["gate"]["exit_code"] == proc.returncode
    proc = subprocess.run([sys.executable, "-m", "hallway_audit", str(mlp) + ".missing"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr


def test_nan_weights_are_a_finding_of_the_default_rules(capsys, nan_mlp):
    code, out, _ = run(capsys, str(nan_mlp), "--format", "json", "--fail-on", "never")
    doc = json.loads(out)
    assert code == 0
    assert any(f["layer"] == "net.2" and f["verdict"] == "fix_weights" for f in doc["findings"])
    layer = {entry["name"]: entry for entry in doc["static"]["layers"]}["net.2"]
    assert layer["nonfinite"] == 1


def test_color_only_on_a_terminal(mlp):
    from hallway_audit.audit import audit
    from hallway_audit.report import RenderOptions, get_formatter

    result = audit(mlp)
    colored = get_formatter("table").render(result, RenderOptions(color=True))
    plain = get_formatter("table").render(result, RenderOptions(color=False))
    assert "\x1b[" in colored and "\x1b[" not in plain


def test_a_sweep_passes_the_gate_when_one_setting_passes(capsys):
    """bf16 at lr 1e-5 without master weights rounds almost every step away (errors); with
    fp32 master weights the sub-ULP steps accumulate: the plan can train."""
    common = [str(EXAMPLE), "--calib", str(EXAMPLE / "calib.safetensors"), "--precision", "bf16", "--lr", "1e-5",
              "--steps", "2", "--samples", "8", "-q"]
    stuck = ("loss-does-not-drop", "weights-do-not-cross-cells")
    code, out, _ = run(capsys, *common, "--master-weights", "none", "--format", "json")
    doc = json.loads(out)
    assert code == 1 and any(f["rule"] in stuck for f in doc["findings"])
    code, out, _ = run(capsys, *common, "--master-weights", "none,fp32", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["gate"]["reason"] == "1 of 2 probed settings pass"
    assert doc["recommendation"]["setting"] == "bf16/full/adamw-1e-05"
    assert any(f["setting"] == "bf16/nomaster/full/adamw-1e-05" and f["severity"] == "error" for f in doc["findings"])
    code, xml, _ = run(capsys, *common, "--master-weights", "none,fp32", "--format", "junit")
    root = ET.fromstring(xml)
    assert code == 0 and root.get("failures") == "0"  # the XML agrees with the exit code
    waived = [c for c in root.iter("testcase") if "nomaster" in c.get("name") and c.find("system-out") is not None]
    assert waived, "the failing setting's findings are still reported"


@pytest.mark.parametrize("exc", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_out_of_memory_is_exit_6_with_one_line(capsys, monkeypatch, mlp, exc):
    # Exhausting the host's memory for real would take the test machine down with
    # it; the failure is raised where a large tensor is measured instead.
    import hallway_audit.static.audit as static_audit

    def exhausted(*args, **kwargs):
        raise exc

    monkeypatch.setattr(static_audit, "measure_tensor", exhausted)
    monkeypatch.setattr(static_audit, "measure_many", exhausted)  # small tensors are measured together
    code, out, err = run(capsys, str(mlp))
    assert code == 6 and out == ""
    assert err.count("\n") == 1 and "out of memory" in err and "Traceback" not in err


def test_unexpected_exception_is_exit_70_without_traceback(capsys, monkeypatch, mlp):
    import hallway_audit.static.audit as static_audit

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(static_audit, "measure_tensor", broken)
    monkeypatch.setattr(static_audit, "measure_many", broken)  # small tensors are measured together
    code, _, err = run(capsys, str(mlp))
    assert code == 70 and "internal error: ZeroDivisionError" in err and "Traceback" not in err


def test_a_reader_that_leaves_early_is_not_an_internal_error(monkeypatch, capsys):
    """`hallway-audit audit --help | head -1`: the pipe closes under click's echo; exit 141
    (SIGPIPE's shell code) with nothing on stderr, not exit 70 with a traceback."""
    import io

    class ClosedPipe(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise io.UnsupportedOperation("no descriptor")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["audit", "--help"]) == 141
    assert capsys.readouterr().err == ""
