"""Hostile names through the real CLI, in every output format.

Tensor and module names (safetensors allows any UTF-8), rule messages and setting ids
holding newlines, carriage returns, ESC sequences, other control characters, rich
markup, pipes, backticks, HTML and Markdown headers must come out as data: no forged
line, no terminal escape, no markup error, valid XML, JSON that round-trips.
"""

from __future__ import annotations

import importlib.util
import json
import re
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hallway_audit.cli import main
from hallway_audit.report.escape import visible

from .harness import assert_refused, assert_unchanged, digest, run_cli

NAMES = [
    "a\n## gate passed\n",
    "b\r\x1b[31mred",
    "c[/]x[bold]",
    "d`|<script>&\"#",
    "e\x07\x0b\x7f\x9b\u2028\u202e",
    "# forged header",
]

RULES = r"""
extends: [default.yaml]
rules:
  - id: hostile-message
    scope: layer
    when: params > 0
    severity: warning
    verdict: check_range
    message: "[/]{layer}[bold] `x` | <b>y</b>\n## gate passed\r\x1b[2J done"
"""

MODEL = '''
import torch

NAMES = {names!r}


class Evil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name in NAMES:
            self.add_module(name, torch.nn.Linear(8, 8))

    def forward(self, inputs):
        h = inputs
        for name in NAMES:
            h = torch.tanh(getattr(self, name)(h))
        return h


def build():
    return Evil()
'''

OUR_HEADERS = re.compile(r"(## hallway-audit: gate (passed|failed) .|### (Whole model|Probe bursts|Recommendation|Findings|Layers))$")


def _unsafe_chars(text: str) -> list[str]:
    return sorted({repr(ch) for ch in text if ch != "\n" and (unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs")
                                                              or ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")})


def _strip_code_spans(line: str) -> str:
    return re.sub(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", "", line)


def _check_markdown(md: str) -> None:
    lines = md.splitlines()
    assert not _unsafe_chars(md)
    fence = None  # inside a fenced code block nothing is markup, and only its own fence closes it
    for line in lines:
        if fence is not None:
            if line == fence:
                fence = None
            continue
        opened = re.match(r"(`{3,})[a-z]*$", line)
        if opened:
            fence = opened.group(1)
            continue
        if line.startswith("#"):
            assert OUR_HEADERS.match(line), f"forged header: {line!r}"
        assert "<" not in _strip_code_spans(line), f"raw HTML: {line!r}"
    assert fence is None, "an unclosed code fence swallows the rest of the report"
    columns = None
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            columns = None
            continue
        pipes = len(re.findall(r"(?<!\\)\|", line))
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            columns = pipes
        assert pipes == columns, f"forged table cell: {line!r}"


def _check_all(outputs: dict[str, str], names: list[str], messages: list[str]) -> None:
    table, md, xml, doc = outputs["table"], outputs["markdown"], outputs["junit"], json.loads(outputs["json"])
    for text in (table, xml):
        assert not _unsafe_chars(text), _unsafe_chars(text)
    assert not any(line.lstrip(" │").startswith("## gate passed") for line in table.splitlines())
    for name in names:
        assert visible(name) in table, visible(name)
    assert "[/]" in table and "[bold]" in table  # shown, not parsed as markup
    _check_markdown(md)
    root = ET.fromstring(xml)
    cases = {c.get("name") for c in root.iter("testcase")}
    assert {visible(n) for n in names} <= {c.split(" [")[0] for c in cases}
    layers = {layer["name"] for layer in doc["static"]["layers"]}
    assert set(names) <= layers  # JSON holds the names exactly
    assert set(messages) <= {f["message"] for f in doc["findings"]}
    assert outputs["json"].isascii() and not _unsafe_chars(outputs["json"])  # every control character escaped


def _write_checkpoint(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({f"{n}.weight": torch.randn(8, 8, generator=g) * 0.05 for n in NAMES}, str(path))
    return path


def _outputs(tmp_path: Path, stdout: str) -> dict[str, str]:
    files = {"json": "a.json", "markdown": "a.md", "junit": "a.xml"}
    return {"table": stdout, **{fmt: (tmp_path / name).read_text(encoding="utf-8") for fmt, name in files.items()}}


OUTPUT_ARGS = ["--format", "table", "--output-json", "a.json", "--output-markdown", "a.md", "--output-junit", "a.xml"]


def test_hostile_tensor_names_and_rule_messages_in_every_format(tmp_path, capsys, monkeypatch):
    ckpt = _write_checkpoint(tmp_path / "evil.safetensors")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    before = digest([ckpt, rules])
    out = run_cli([str(ckpt), "--rules", str(rules), *OUTPUT_ARGS], cwd=tmp_path)
    assert_refused(out, (0, 1))  # a run, not a refusal: no traceback, no error line
    assert_unchanged(before, [ckpt, rules])
    outputs = _outputs(tmp_path, out.stdout)
    message = "[/]{}[bold] `x` | <b>y</b>\n## gate passed\r\x1b[2J done"
    _check_all(outputs, NAMES, [message.format(n) for n in NAMES])
    # re-rendering the saved report gives the same escaped text
    monkeypatch.setenv("COLUMNS", "120")
    for fmt in ("table", "markdown", "junit", "json"):
        main(["render", str(tmp_path / "a.json"), "--format", fmt])
        assert capsys.readouterr().out == outputs[fmt], fmt


@pytest.mark.slow
def test_hostile_module_names_and_setting_ids_in_a_sweep(tmp_path):
    """Module names from a model (add_module accepts them) reach the probe tables, the
    recommendation and the findings; --targets with `|` puts a pipe in every setting id."""
    source = tmp_path / "model.py"
    source.write_text(MODEL.format(names=NAMES), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("hostile_names_model", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build()
    ckpt = tmp_path / "evil.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": x, "targets": torch.tanh(x @ torch.randn(8, 8, generator=g))}, str(calib))
    before = digest([ckpt, calib, source])
    out = run_cli([str(ckpt), "--model", f"{source}:build", "--calib", str(calib), "--loss", "mse", "--rank", "1,2",
                   "--precision", "bf16", "--targets", "a|b|c|d|e|#", "--steps", "1", "--samples", "8", "-q",
                   *OUTPUT_ARGS], cwd=tmp_path)
    assert_refused(out, (0, 1))
    assert_unchanged(before, [ckpt, calib, source])
    outputs = _outputs(tmp_path, out.stdout)
    doc = json.loads(outputs["json"])
    assert doc["settings"] and all("|" in s["id"] for s in doc["settings"])
    _check_all(outputs, NAMES, [])
    for s in doc["settings"]:
        assert f"`{s['id'].replace('|', chr(92) + '|')}`" in outputs["markdown"]  # a code span, pipe escaped
