"""Outputs: several from one run, checked before the run, never touching an input;
written atomically (devices, FIFOs and symlinks kept, the umask honoured); and
`hallway-audit render` re-rendering a saved report exactly."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import EXAMPLE, tiny_mlp_state, write_rules, write_safetensors

from hallway_audit.cli import main
from hallway_audit.errors import OutputError, UsageError
from hallway_audit.report import write_atomic
from hallway_audit.report.inputs import RunInput, run_inputs
from hallway_audit.report.outputs import OutputSpec, check_outputs, output_plan

NAN_RULE = """
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


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def mlp(tmp_path):
    return write_safetensors(tmp_path / "mlp.safetensors", tiny_mlp_state())


@pytest.fixture()
def nan_mlp(tmp_path):
    state = tiny_mlp_state()
    state["net.2.weight"][0, 0] = float("nan")
    return write_safetensors(tmp_path / "nan.safetensors", state)


# --- several outputs ---------------------------------------------------------------------


def test_one_run_writes_every_requested_output(capsys, tmp_path, mlp):
    code, out, err = run(capsys, str(mlp), "--format", "table", "--format", f"json:{tmp_path / 'a.json'}",
                         "--format", f"junit:{tmp_path / 'a.xml'}", "--output-markdown", str(tmp_path / "a.md"))
    assert code in (0, 1)
    assert out.startswith("╭─ hallway-audit") and "Layers, most severe first" in out  # the table on stdout
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["gate"]["exit_code"] == code
    ET.fromstring((tmp_path / "a.xml").read_text())
    assert (tmp_path / "a.md").read_text().startswith("## hallway-audit: gate")
    assert sorted(line.split()[2] for line in err.splitlines()) == sorted(str(tmp_path / n) for n in ("a.json", "a.xml", "a.md"))
    # the file holds what --format json prints on stdout
    assert run(capsys, str(mlp), "--format", "json")[1] == (tmp_path / "a.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_shortcuts_add_to_the_table_on_stdout(capsys, tmp_path, mlp):
    code, out, _ = run(capsys, str(mlp), "--output-json", str(tmp_path / "a.json"))
    assert out.startswith("╭─ hallway-audit") and json.loads((tmp_path / "a.json").read_text())["gate"]["exit_code"] == code


def test_format_with_o_stays_valid(capsys, tmp_path, mlp):
    _code, out, _ = run(capsys, str(mlp), "--format", "markdown", "-o", str(tmp_path / "r.md"))
    assert out == "" and (tmp_path / "r.md").read_text().startswith("## hallway-audit")
    _code, out, _ = run(capsys, str(mlp), "-o", str(tmp_path / "r.txt"))  # no --format: the table
    assert out == "" and (tmp_path / "r.txt").read_text().startswith("╭─ hallway-audit")


def test_dev_stdout_is_the_stdout_output(capsys, mlp):
    code, out, _ = run(capsys, str(mlp), "--format", "json", "-o", "/dev/stdout")
    assert json.loads(out)["gate"]["exit_code"] == code


@pytest.mark.parametrize(
    ("formats", "output", "extra", "needle"),
    [
        (["table", "json"], None, [], "only one output can go to stdout"),
        (["json"], None, [("markdown", "/dev/stdout")], "only one output can go to stdout"),
        (["table", "json"], "r.txt", [], "several --format values have no FILE"),
        (["json:a.json"], "r.txt", [], "every --format already names its FILE"),
        (["yaml"], None, [], "unknown output format 'yaml'"),
        (["json:"], None, [], "FILE is empty"),
    ],
)
def test_output_plan_conflicts_are_usage_errors(formats, output, extra, needle):
    with pytest.raises(UsageError, match=needle):
        output_plan(formats, output, extra)


def test_output_plan_reads_fmt_file_and_o():
    assert output_plan([]) == [OutputSpec("table", None, "--format table")]
    assert output_plan(["json:out/a:b.json"]) == [OutputSpec("json", "out/a:b.json", "--format json:out/a:b.json")]
    plan = output_plan(["junit:a.xml", "json"], "r.json", [("markdown", "a.md")])
    assert [(o.format, o.path) for o in plan] == [("junit", "a.xml"), ("json", "r.json"), ("markdown", "a.md")]


def test_two_outputs_cannot_write_one_file(capsys, tmp_path, mlp):
    target = tmp_path / "r.json"
    code, out, err = run(capsys, str(mlp), "--format", f"json:{target}", "--output-junit", str(target))
    assert code == 2 and "two outputs write" in err and out == "" and not target.exists()
    os.symlink(target, tmp_path / "link.json")
    with pytest.raises(UsageError, match="two outputs write"):
        check_outputs(output_plan([f"json:{target}", f"markdown:{tmp_path / 'link.json'}"]), [])


# --- outputs never touch inputs ----------------------------------------------------------


def _hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    write_safetensors(d / "model.safetensors", tiny_mlp_state())
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.mark.parametrize(
    "case",
    ["checkpoint", "symlink-to-checkpoint", "hardlink-to-checkpoint", "file-in-checkpoint-dir", "new-file-in-checkpoint-dir",
     "shard-of-index", "rule-file", "rule-file-extended", "plan", "peft-config", "calib", "val", "model-source", "loss-source"],
)
def test_an_output_that_is_an_input_is_refused_before_the_run(capsys, tmp_path, case):
    ckpt = write_safetensors(tmp_path / "m.safetensors", tiny_mlp_state())
    args = [str(ckpt)]
    target: Path = ckpt
    if case == "symlink-to-checkpoint":
        target = tmp_path / "report.json"
        os.symlink(ckpt, target)
    elif case == "hardlink-to-checkpoint":
        target = tmp_path / "report.json"
        os.link(ckpt, target)
    elif case in ("file-in-checkpoint-dir", "new-file-in-checkpoint-dir"):
        d = _hf_dir(tmp_path)
        args = [str(d)]
        target = d / ("tokenizer.json" if case == "file-in-checkpoint-dir" else "audit.json")
    elif case == "shard-of-index":
        shard = write_safetensors(tmp_path / "s-1.safetensors", tiny_mlp_state())
        index = tmp_path / "m.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": dict.fromkeys(tiny_mlp_state(), "s-1.safetensors")}))
        args, target = [str(index)], shard
    elif case == "rule-file":
        target = write_rules(tmp_path / "r.yaml", NAN_RULE)
        args += ["--rules", str(target)]
    elif case == "rule-file-extended":
        target = write_rules(tmp_path / "base.yaml", NAN_RULE)
        child = write_rules(tmp_path / "child.yaml", "extends: [./base.yaml]\n")
        args += ["--rules", str(child)]
    elif case == "plan":
        target = tmp_path / "plan.yaml"
        target.write_text("precision: [bf16]\n")
        args += ["--plan", str(target)]
    elif case == "peft-config":
        target = tmp_path / "adapter_config.json"
        target.write_text('{"r": 4, "target_modules": ["net.0"]}')
        calib = write_safetensors(tmp_path / "calib.safetensors", {"inputs": tiny_mlp_state()["net.0.weight"]})
        args += ["--peft-config", str(target), "--calib", str(calib)]
    elif case != "checkpoint":  # the dynamic audit's files: refused before any model is built or data read
        calib = write_safetensors(tmp_path / "calib.safetensors", {"inputs": tiny_mlp_state()["net.0.weight"]})
        val = write_safetensors(tmp_path / "val.safetensors", {"inputs": tiny_mlp_state()["net.0.weight"]})
        source = tmp_path / "factories.py"
        source.write_text("def build():\n    raise SystemExit('must not run')\n\ndef loss(model, batch):\n    raise SystemExit('no')\n")
        args += ["--calib", str(calib), "--val", str(val), "--model", f"{source}:build", "--loss", f"{source}:loss"]
        target = {"calib": calib, "val": val, "model-source": source, "loss-source": source}[case]
    before = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    code, out, err = run(capsys, *args, "--format", "json", "-o", str(target))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and ("an input of the run" in err or "outside the checkpoint" in err), err
    assert out == ""
    after = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing changed, nothing new (no temp file either)


def test_run_inputs_of_a_checkpoint_directory_and_code_specs(tmp_path):
    d = _hf_dir(tmp_path)
    (d / "sub").mkdir()
    (d / "sub" / "vocab.txt").write_text("a")
    found = run_inputs(d, model="pkg.module:build", loss=f"{tmp_path}/l.py:fn")
    paths = {Path(i.path) for i in found}
    assert {d, d / "config.json", d / "model.safetensors", d / "tokenizer.json", d / "sub" / "vocab.txt"} <= paths
    assert [i.directory for i in found if Path(i.path) == d] == [True]
    assert Path(f"{tmp_path}/l.py") in paths and not any("pkg" in i.path for i in found)


def test_bundled_rules_and_other_paths_do_not_collide(tmp_path):
    outputs = output_plan([f"json:{tmp_path / 'default.yaml'}"])
    check_outputs(outputs, run_inputs(None, rules=["default.yaml"]))  # a file named like a bundled one is not it


def test_a_bad_output_fails_before_the_checkpoint_is_read(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")  # would be exit 3 once read
    code, _, err = run(capsys, str(bad), "--format", "json", "-o", str(tmp_path / "missing" / "r.json"))
    assert code == 5 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, str(bad), "-o", str(tmp_path))
    assert code == 5 and "is a directory" in err
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        code, _, err = run(capsys, str(bad), "-o", str(sock))
    assert code == 5 and "not a regular file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_directory_fails_before_the_run(capsys, tmp_path, mlp):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(capsys, str(mlp), "-o", str(locked / "r.txt"))
    assert code == 5 and "not writable" in err


# --- writing -------------------------------------------------------------------------------


def test_new_file_gets_the_umask_and_a_replaced_file_keeps_its_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o604)
    write_atomic(kept, "new")
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o604


def test_a_symlinked_output_replaces_its_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    os.symlink(real, link)
    write_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(real) and real.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    os.symlink(tmp_path / "created.json", dangling)
    write_atomic(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "created.json").read_text() == "made"


def test_devices_and_fifos_are_written_through(tmp_path):
    write_atomic("/dev/null", "discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_atomic(fifo, "through the pipe\n")
    reader.join(timeout=30)
    assert got == ["through the pipe\n"] and stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_the_temp_file_is_removed_on_failure(tmp_path, monkeypatch, interrupt):
    target = tmp_path / "r.json"
    target.write_text("previous")

    def fail(fd):
        raise interrupt(28, "No space left on device") if interrupt is OSError else interrupt()

    monkeypatch.setattr(os, "fsync", fail)  # the disk fails (or Ctrl-C arrives) mid-write
    with pytest.raises(OutputError if interrupt is OSError else KeyboardInterrupt):
        write_atomic(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and target.read_text() == "previous"


def test_unencodable_text_is_exit_5_and_leaves_no_temp(tmp_path):
    with pytest.raises(OutputError, match="not encodable"):
        write_atomic(tmp_path / "r.txt", "lone \ud800 surrogate")
    assert list(tmp_path.iterdir()) == []


def test_check_outputs_names_the_input(tmp_path, mlp):
    link = tmp_path / "l.json"
    os.symlink(mlp, link)
    with pytest.raises(UsageError) as info:
        check_outputs(output_plan(["json"], str(link)), [RunInput(str(mlp), "the checkpoint")])
    assert str(info.value) == f"-o {link}: {link} is the checkpoint {mlp}; refusing to overwrite an input of the run"


# --- render ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The bundled example's static audit and a failing NaN audit, each rendered directly in
    every format and saved as JSON."""
    root = tmp_path_factory.mktemp("render")
    state = tiny_mlp_state()
    state["net.2.weight"][0, 0] = float("nan")
    nan = write_safetensors(root / "nan.safetensors", state)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "120")
        for name, args in (("example", [str(EXAMPLE)]), ("nan", [str(nan), "--max-rows", "1"])):
            files = {fmt: root / f"{name}.{fmt}" for fmt in ("table", "markdown", "junit", "json")}
            code = main([*args, *(x for fmt, p in files.items() for x in ("--format", f"{fmt}:{p}"))])
            out[name] = (code, files)
    return out


@pytest.mark.parametrize("name", ["example", "nan"])
@pytest.mark.parametrize("fmt", ["table", "markdown", "junit", "json"])
def test_render_gives_what_the_audit_wrote(capsys, monkeypatch, saved, name, fmt):
    monkeypatch.setenv("COLUMNS", "120")
    code, files = saved[name]
    extra = ["--max-rows", "1"] if name == "nan" else []
    rcode, out, err = run(capsys, "render", str(files["json"]), "--format", fmt, *extra)
    assert out == files[fmt].read_text() and err == ""
    assert rcode == code == (1 if name == "nan" else 0)  # the gate's exit code, stored in the report


def test_render_to_a_file_and_never_over_the_report(capsys, tmp_path, saved):
    _, files = saved["nan"]
    code, _, err = run(capsys, "render", str(files["json"]), "--format", f"markdown:{tmp_path / 'r.md'}", "--max-rows", "1")
    assert code == 1 and (tmp_path / "r.md").read_text() == files["markdown"].read_text()
    before = sha(files["json"])
    code, _, err = run(capsys, "render", str(files["json"]), "--format", "json", "-o", str(files["json"]))
    assert code == 2 and "the report being rendered" in err and sha(files["json"]) == before


def _mutate(doc: dict, case: str) -> object:
    if case == "list":
        return [doc]
    if case == "foreign":
        return {"name": "something else"}
    if case == "major":
        doc["schema_version"] = "2.0"
    elif case == "missing":
        del doc["static"]["layers"][0]["formats"]
    elif case == "type":
        doc["findings"][0]["message"] = 3
    elif case == "severity":
        doc["findings"][0]["severity"] = "fatal"
    elif case == "exit":
        doc["gate"]["exit_code"] = 0
    elif case == "bool-exit":
        doc["gate"]["exit_code"] = True
    elif case == "unknown-rule":
        doc["outcomes"][0]["rule"] = "nobody"
    return doc


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("list", "not a hallway-audit JSON report"),
        ("foreign", "not a hallway-audit JSON report"),
        ("major", "schema '2.0' is not supported"),
        ("missing", "static.layers[0]: missing key 'formats'"),
        ("type", "findings[0].message: expected a string"),
        ("severity", "findings[0].severity"),
        ("exit", "gate.exit_code: does not agree with gate.passed"),
        ("bool-exit", "gate.exit_code"),
        ("unknown-rule", "'nobody'"),
        ("not-json", "not a JSON report"),
        ("nan", "not a JSON report: NaN is not JSON"),
        ("binary", "not UTF-8"),
        ("missing-file", "cannot read the report"),
    ],
)
def test_render_refuses_what_is_not_a_report(capsys, tmp_path, saved, case, needle):
    _, files = saved["nan"]
    doc = json.loads(files["json"].read_text())
    path = tmp_path / "r.json"
    if case == "not-json":
        path.write_text("{ nope")
    elif case == "nan":
        path.write_text(files["json"].read_text().replace('"lr": 0.0001', '"lr": NaN', 1))
    elif case == "binary":
        path.write_bytes(b"\xff\xfe{}")
    elif case != "missing-file":
        path.write_text(json.dumps(_mutate(doc, case)))
    code, out, err = run(capsys, "render", str(path), "--format", "table")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and str(path) in err, err


def test_render_junit_needs_schema_1_3(capsys, tmp_path, saved):
    _, files = saved["nan"]
    doc = json.loads(files["json"].read_text())
    doc["schema_version"] = "1.2"
    del doc["outcomes"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    code, out, _ = run(capsys, "render", str(old), "--format", "markdown", "--max-rows", "1")
    assert code == 1 and out == files["markdown"].read_text()  # what 1.2 holds still renders
    code, _, err = run(capsys, "render", str(old), "--format", "junit")
    assert code == 2 and "schema 1.3" in err
