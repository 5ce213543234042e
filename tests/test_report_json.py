"""The JSON report's fast paths give exactly what the slow ones gave.

* indented_json writes json.dumps(value, indent=2, sort_keys=True, allow_nan=False)
  byte for byte (and raises where it raises), whole or streamed in pieces;
* schema.plain is the JSON round trip json.loads(json.dumps(clean(value),
  sort_keys=True)): same values, types and key order, fresh containers;
* as_document(result), built without the round trip, reads back as itself and
  shares nothing with the result;
* publish renders every output before it replaces any file.
"""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLE, tiny_mlp_state, write_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hallway_audit.audit import DynamicPlan, audit
from hallway_audit.probe import BurstOptions, SweepSpec
from hallway_audit.report import FORMATTERS, as_document, indented_json
from hallway_audit.report import outputs as outputs_module
from hallway_audit.report.base import Formatter, RenderOptions
from hallway_audit.report.indented_json import BATCH, dumps_indented, write_indented
from hallway_audit.report.outputs import OutputSpec, publish
from hallway_audit.report.schema import clean, plain


def _stdlib(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False)


def _pieces(value: Any) -> list[str]:
    out: list[str] = []
    write_indented(value, out.append)
    return out


# Strings that could confuse a writer that edits encoded text: brackets, quotes,
# separators, line breaks and the exact item boundary the record batches rewrite.
NASTY = ["}", "{", "},\n    {", "}, {", '"', "\\", "\n", ": ", ",", "[]", "{}", "é", "\u2028", "\x00", "\ud800", ""]
text = st.one_of(st.text(max_size=12), st.sampled_from(NASTY))
finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70), finite, text)
keys = st.one_of(text, st.integers(-3, 3).map(str))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=5),
        st.dictionaries(st.integers(-5, 5), children, max_size=3),  # int keys, written as strings
        st.lists(st.dictionaries(keys, scalars, min_size=1, max_size=4), max_size=6),  # runs of records
    )


json_values = st.recursive(scalars, _containers, max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_indented_json_is_json_dumps(value: Any) -> None:
    want = _stdlib(value)
    assert dumps_indented(value) == want
    assert "".join(_pieces(value)) == want


def test_long_runs_of_records_cross_batches_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outcome-like dicts in runs longer than a batch, broken by other items, with
    strings holding the item boundary; streamed in many pieces."""
    monkeypatch.setattr(indented_json, "CHUNK", 4096)
    records: list[Any] = []
    for i in range(3 * BATCH + 7):
        records.append({"layer": f"layers.{i}.w", "message": NASTY[i % len(NASTY)], "rule": "r}", "n": i,
                        "x": i / 7, "ok": i % 2 == 0, "none": None})
        if i % 997 == 0:
            records.append({"nested": {"a": [1, {}]}, "empty": []})
            records.append({})
            records.append([])
            records.append("plain")
    doc = {"outcomes": records, "more": [{"k": "v"}] * (BATCH + 1), "deep": {"records": records[:50]}}
    want = _stdlib(doc)
    pieces = _pieces(doc)
    assert "".join(pieces) == want
    assert len(pieces) > 3


@pytest.mark.parametrize(("value", "error"), [
    ({"a": float("nan")}, ValueError),
    ([{"a": float("inf")}], ValueError),
    ({"a": {1, 2}}, TypeError),
    ({"a": [{"b": object()}]}, TypeError),
    ({(1, 2): "tuple key"}, TypeError),
    ({1: "a", "b": "mixed keys cannot be sorted"}, TypeError),
])
def test_indented_json_refuses_what_json_refuses(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        _stdlib(value)
    with pytest.raises(error):
        dumps_indented(value)


def test_indented_json_refuses_a_cycle() -> None:
    loop: dict[str, Any] = {"a": [1]}
    loop["a"].append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps_indented(loop)


# --- plain: the round trip without the text ---------------------------------------------


class Level(enum.IntEnum):
    LOW = 1


class Name(str):
    pass


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types, dict keys in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _round_trip(value: Any) -> Any:
    return json.loads(json.dumps(clean(value), sort_keys=True, allow_nan=False))


def _container_ids(value: Any, out: set[int]) -> set[int]:
    if isinstance(value, (dict, list, tuple)):
        out.add(id(value))
        for item in value.values() if isinstance(value, dict) else value:
            _container_ids(item, out)
    return out


odd_scalars = st.one_of(
    scalars, st.floats(), st.sampled_from([Level.LOW, Name("sub"), math.inf, -math.inf]),
)
plain_values = st.recursive(odd_scalars, lambda c: st.one_of(
    st.lists(c, max_size=4), st.lists(c, max_size=3).map(tuple), st.dictionaries(keys, c, max_size=4),
    st.dictionaries(st.sampled_from([None]), c, max_size=1), st.dictionaries(st.floats(0, 9), c, max_size=3),
), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain_values)
def test_plain_is_the_json_round_trip(value: Any) -> None:
    got = plain(value)
    assert _same(got, _round_trip(value))
    kept = _container_ids(value, set()) & _container_ids(got, set())
    assert not kept  # fresh containers: changing the document never changes what it came from


# --- the document of real audits ------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("docs")
    state = tiny_mlp_state()
    state["net.2.weight"][0, 0] = float("nan")  # inf/nan figures, findings, a failed gate
    state["net.0.weight"].zero_()  # rel_error 0: sqnr_db inf
    nan = write_safetensors(root / "nan.safetensors", state)
    plan = DynamicPlan(calib=str(EXAMPLE / "calib.safetensors"), sweep=SweepSpec(precision=["bf16"], rank=[4], lr=[1e-4]),
                       burst=BurstOptions(steps=1, samples=8))
    return {"static": audit(nan, formats=["bf16", "fp8_e4m3", "int4"]), "dynamic": audit(EXAMPLE, formats=["bf16"], dynamic=plan)}


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_the_document_reads_back_as_itself_and_shares_nothing(results: dict[str, Any], which: str) -> None:
    result = results[which]
    doc = as_document(result)
    assert _same(doc, json.loads(json.dumps(doc, sort_keys=True, allow_nan=False)))
    assert _same(doc, as_document(result.to_dict()))  # the Mapping path, through the text
    if which == "static":
        assert None in [layer["formats"]["bf16"]["sqnr_db"] for layer in doc["static"]["layers"]]
    else:
        assert doc["settings"] and doc["dynamic"] is not None
    text = json.dumps(doc, sort_keys=True)
    _clear(doc)  # a formatter or a user editing the document...
    assert json.dumps(as_document(result), sort_keys=True) == text  # ...changes nothing in the result


def _clear(value: Any) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _clear(item)
        value.clear()
    elif isinstance(value, list):
        for item in value:
            _clear(item)
        value.clear()


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_the_json_report_is_json_dumps_of_the_document(results: dict[str, Any], which: str) -> None:
    doc = as_document(results[which])
    formatter = FORMATTERS["json"]()
    text = formatter.render_document(doc, RenderOptions())
    assert text == _stdlib(doc) + "\n"
    streamed: list[str] = []
    formatter.render_stream(doc, RenderOptions(), streamed.append)
    assert "".join(streamed) == text


# --- publish: every output renders before any file is replaced ------------------------------


class _Broken(Formatter):
    """A formatter with a rendering bug."""

    name = "broken"
    machine = True
    suffix = ".txt"

    def render_document(self, doc: Any, options: RenderOptions) -> str:
        raise RuntimeError("rendering bug")


def test_a_failing_output_leaves_every_file_as_it_was(tmp_path: Path, results: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(FORMATTERS, "broken", _Broken)
    doc = as_document(results["static"])
    old = tmp_path / "old.json"
    old.write_text("previous report")
    outputs = [OutputSpec("json", str(old), "--format json:old.json"), OutputSpec("json", str(tmp_path / "new.json"), "x"),
               OutputSpec("table", None, "--format table"), OutputSpec("broken", str(tmp_path / "b.txt"), "x")]
    with pytest.raises(RuntimeError, match="rendering bug"):
        publish(doc, outputs, max_rows=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"] and old.read_text() == "previous report"
    assert capsys.readouterr().out == ""
    written = publish(doc, outputs[:3], max_rows=5)  # without the broken one: files, then stdout
    assert [o.path for o in written] == [str(old), str(tmp_path / "new.json")]
    assert old.read_text() == (tmp_path / "new.json").read_text() == _stdlib(doc) + "\n"
    assert capsys.readouterr().out.startswith("╭─ hallway-audit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "old.json"]


def test_stdout_gets_the_whole_report_through_a_spool_on_disk(results: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(outputs_module, "SPOOL_BYTES", 100)  # rolls over to a temp file at once
    monkeypatch.setattr(indented_json, "CHUNK", 512)  # and arrives in many pieces
    doc = as_document(results["dynamic"])
    assert publish(doc, [OutputSpec("json", None, "--format json")], max_rows=5) == []
    assert capsys.readouterr().out == _stdlib(doc) + "\n"
