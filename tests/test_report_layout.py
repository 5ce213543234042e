"""Tables readable in a pipe at 80, 120 and 200 columns: nothing wider than the width,
layer names abbreviated predictably (never broken across lines), the verdict never
dropped, and a "+N more" line whenever rows are cut."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import EXAMPLE, tiny_mlp_state, write_safetensors
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len

from hallway_audit import AuditPlan
from hallway_audit.audit import DynamicPlan, audit
from hallway_audit.probe import BurstOptions, SweepSpec
from hallway_audit.report import RenderOptions, get_formatter
from hallway_audit.report.document import as_document
from hallway_audit.report.layout import ELLIPSIS, abbreviate, report_width
from hallway_audit.report.rows import ranked_layers, verdict_label

WIDTHS = (80, 120, 200)


@pytest.mark.parametrize(
    ("name", "width", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", 40, "model.layers.3.self_attn.q_proj"),
        ("model.layers.3.self_attn.q_proj", 21, "model.layers.3…q_proj"),
        ("model.layers.3.self_attn.q_proj", 19, "…3.self_attn.q_proj"),
        ("model.layers.3.self_attn.q_proj", 16, "…layers.3…q_proj"),
        ("model.layers.3.self_attn.q_proj", 12, "…3…q_proj"),
        ("lm_head.weight_of_a_long_name", 12, "lm_head…name"),
        ("model.layers.0.post_attention_layernorm", 25, "model.layers.0…_layernorm"),
        ("model.layers.0.post_attention_layernorm", 31, "…0.post_attention_layernorm"),
        ("encoder.block.17.layer.1.DenseReluDense.wi_0", 25, "encoder.block.17…wi_0"),
        ("transformer.encoder.layers.0.attention_block.output_projection_after_attention", 21, "…layers.0…r_attention"),
        ("x" * 30, 10, "xxx…xxxxxx"),
    ],
)
def test_abbreviation_keeps_head_block_index_and_tail(name, width, expected):
    assert abbreviate(name, width) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=ELLIPSIS), min_size=1, max_size=12)
             | st.integers(0, 99).map(str), min_size=1, max_size=8),
    st.integers(2, 60),
)
def test_abbreviation_fits_and_is_a_head_and_a_tail(parts, width):
    name = ".".join(parts)
    short = abbreviate(name, width)
    assert cell_len(short) <= width
    if cell_len(name) <= width:
        assert short == name
    else:
        pieces = short.split(ELLIPSIS)
        assert len(pieces) in (2, 3) and name.startswith(pieces[0]) and name.endswith(pieces[-1])
        at = len(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):  # the pieces appear in order and do not overlap
            found = name.find(piece, at) if i < len(pieces) - 1 else len(name) - len(piece)
            assert found >= at
            at = found + len(piece)


def test_report_width_prefers_columns_then_the_default():
    assert report_width(False, {"COLUMNS": "80"}) == 80
    assert report_width(False, {"COLUMNS": "wide"}) == 120
    assert report_width(False, {}) == 120
    assert report_width(False, {"COLUMNS": "5"}) == 40  # the narrowest table that still reads


def _long_named_checkpoint(path):
    """Layer names of 60-90 characters, as in deeply nested or vendor-named models."""
    base = tiny_mlp_state()["net.0.weight"]
    state = {}
    for block in range(3):
        prefix = f"transformer.encoder.layers.{block}.attention_block_with_rotary_embeddings"
        state[f"{prefix}.query_key_value_fused_projection.weight"] = base * (block + 1)
        state[f"{prefix}.output_projection_after_attention.weight"] = base / 1000  # beta_pred ~0: verdicts
        state[f"transformer.encoder.layers.{block}.feed_forward_network.dense_h_to_4h.weight"] = base.clone()
    return write_safetensors(path, state)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    plan = DynamicPlan(calib=str(EXAMPLE / "calib.safetensors"), sweep=SweepSpec(precision=["bf16"], rank=[4, 16], lr=[1e-4]),
                       burst=BurstOptions(steps=1, samples=8))
    return {
        # planned without master weights: the static "cannot move" warnings give the tables many findings
        "example": as_document(audit(EXAMPLE, AuditPlan(device="cpu", master_weights=("none",)))),
        "long": as_document(audit(_long_named_checkpoint(root / "long.safetensors"), formats=["bf16", "fp8_e4m3", "int4", "nf4"])),
        "dynamic": as_document(audit(EXAMPLE, formats=["bf16"], dynamic=plan)),
    }


def _table(doc, width, max_rows=40):
    return get_formatter("table").render(doc, RenderOptions(width=width, max_rows=max_rows))


def _layer_rows(text: str) -> list[str]:
    """The row lines of the static layer table (continuation lines start with spaces only)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Layers, most severe first"))
    rule = next(i for i in range(start, len(lines)) if "───" in lines[i])
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        if line[2] != " ":
            rows.append(line)
    return rows


def _is_shown_as(cell: str, name: str) -> bool:
    if cell == name:
        return True
    pieces = cell.split(ELLIPSIS)
    return len(pieces) > 1 and name.startswith(pieces[0]) and name.endswith(pieces[-1]) and all(p in name for p in pieces)


@pytest.mark.parametrize("which", ["example", "long", "dynamic"])
@pytest.mark.parametrize("width", WIDTHS)
def test_every_table_fits_and_keeps_names_whole_and_verdicts(docs, which, width):
    doc = docs[which]
    text = _table(doc, width)
    assert max(cell_len(line) for line in text.splitlines()) <= width
    rows = _layer_rows(text)
    ranked = ranked_layers(doc)
    assert len(rows) == len(ranked)  # one row per layer: no name wrapped onto a second line
    header = next(line for line in text.splitlines() if line.lstrip().startswith("layer ") and "verdict" in line)
    assert header.rstrip().endswith("verdict")
    at = header.index("verdict")  # the verdict column is last and left-justified
    for row, layer in zip(rows, ranked, strict=True):
        cell = row.split()[0]
        assert _is_shown_as(cell, layer.layer["name"]), (cell, layer.layer["name"])
        label = verdict_label(layer.verdicts[0]) if layer.verdicts else "ok"
        assert row[at:].split()[0] in (label.split()[0], label + ","), row  # starts with its first verdict, uncut
    if width == 200 and which != "long":
        assert "not shown at" not in text  # every column fits at 200


def test_dynamic_tables_at_80_columns_keep_verdicts_and_settings(docs):
    doc = docs["dynamic"]
    text = _table(doc, 80)
    settings_block = text[text.index("Probe bursts"):text.index("Layers of")]
    for s in doc["settings"]:
        assert s["id"] in settings_block
        line = next(line for line in settings_block.splitlines() if s["id"] in line)
        assert line.split()[-1] in ("error", "warning", "info", "ok")
    findings = text[text.index("Findings:"):]
    for f in doc["findings"]:
        if f["setting"] and "/" in f["setting"]:
            assert f["setting"] in findings  # under the rule id when its own column would not fit


def test_plus_n_more_when_rows_are_cut(docs):
    doc = docs["example"]
    n_layers = len(doc["static"]["layers"])
    n_findings = len(doc["findings"])
    rows = len({(f["rule"], f["setting"], f["scope"]) for f in doc["findings"]})
    assert 3 < rows < n_findings  # the example both groups findings and has more rows than 3
    text = _table(doc, 120, max_rows=3)
    assert f"+{n_layers - 3} more layers (--max-rows 0 shows all)" in text
    shown = text[text.index("Findings:"):]
    counts = [int(line.split()[1]) for line in shown.splitlines() if line.split()[:1] in (["error"], ["warning"], ["info"])]
    assert len(counts) == 3
    assert f"+{rows - 3} more rows ({n_findings - sum(counts)} findings; --max-rows 0 shows all)" in text
    everything = _table(doc, 120, max_rows=0)
    assert "more layers" not in everything and "more rows" not in everything
    # grouping folds findings into rows: said as such, never as "+N more" (nothing is hidden)
    assert f"{n_findings} findings in {rows} rows (n: findings a row stands for" in everything
    assert "more findings" not in everything
    md = get_formatter("markdown").render(doc, RenderOptions(max_rows=3))
    assert f"_+{n_layers - 3} more layers" in md and f"_+{n_findings - 3} more findings" in md


def test_piped_table_width_comes_from_columns_else_120(tmp_path):
    ckpt = write_safetensors(tmp_path / "m.safetensors", tiny_mlp_state())
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    widths = {}
    for columns in (None, "80"):
        run_env = env if columns is None else {**env, "COLUMNS": columns}
        proc = subprocess.run([sys.executable, "-m", "hallway_audit", str(ckpt)], check=False, capture_output=True,
                              text=True, env=run_env, stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode in (0, 1), proc.stderr
        widths[columns] = max(cell_len(line) for line in proc.stdout.splitlines())
    assert widths == {None: 120, "80": 80}  # the summary panel spans the width
