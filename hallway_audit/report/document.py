"""The JSON document as every formatter reads it, from a result or from a saved file.

`as_document(result)` is the document exactly as `--format json` writes it and
`json.load` reads it back (keys sorted, inf/nan as null), so rendering a result
and rendering its saved report give the same text. `load_report(path)` reads a
saved report and checks, key by key, what the formatters use: a file that is not
a hallway-audit report is a usage error (exit 2) naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..rules import FAIL_ON, SEVERITIES
from .schema import SCHEMA_VERSION, result_to_dict

if TYPE_CHECKING:
    from ..audit import AuditResult

MAX_REPORT_BYTES = 512 << 20


def as_document(report: AuditResult | Mapping[str, Any]) -> dict[str, Any]:
    """The document exactly as a saved report reads back (a result, or its `to_dict()`)."""
    if isinstance(report, Mapping):
        return json.loads(json.dumps(report, sort_keys=True, allow_nan=False))
    return result_to_dict(report)  # built as it reads back: no text round trip


# --- checking a saved report -------------------------------------------------------------
# A tiny structural schema: a type, a tuple of allowed types, a dict of required
# keys, [spec] for a list of spec, {"*": spec} for a mapping of any keys, or a
# Nullable/Choice wrapper.


class Nullable:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


class Choice:
    def __init__(self, *values: Any) -> None:
        self.values = values


NUM = (int, float)
N_NUM = Nullable(NUM)
N_STR = Nullable(str)
SEVERITY = Choice(*SEVERITIES)
FORMAT_SUMMARY = dict.fromkeys(("rel_error", "sqnr_db", "saturated", "flushed", "beta_pred", "ulp_rel_median"), N_NUM)

SETTING = {
    "id": str,
    "model": dict.fromkeys(("psi", "psi_rank", "p_t", "p_t_lo", "p_t_hi", "p_t_uniform", "blocked", "beta", "beta_eff", "loss_delta"), N_NUM),
    "layers": [{
        "name": str, "trainable": bool, "r_star": Nullable(int), "ulp_hist": Nullable({"*": N_NUM}),
        **dict.fromkeys(("psi", "psi_rank", "beta", "beta_eff_elem", "p_t_surrogate"), N_NUM),
    }],
}

DOCUMENT = {
    "schema_version": str,
    "checkpoint": {"path": str, "format": str, "tensors": int, "params": int, "bytes": int},
    "static": {
        "formats": [str],
        "lr": NUM,
        "model": {"formats": {"*": FORMAT_SUMMARY}},
        "layers": [{"name": str, "params": int, "nonfinite": int, "formats": {"*": FORMAT_SUMMARY}}],
        "skipped_tensors": [{"name": str, "reason": str}],
    },
    "rules": {
        "files": [str],
        "summary": [{
            "id": str, "severity": SEVERITY, "verdict": str, "scope": str, "phase": str, "source": str,
            "fired": int, "passed": int, "skipped": int, "skip_reason": N_STR,
        }],
    },
    "findings": [{"rule": str, "severity": SEVERITY, "verdict": str, "scope": str, "layer": N_STR, "setting": N_STR,
                  "message": str}],
    "notes": [str],
    "gate": {"passed": bool, "fail_on": Choice(*FAIL_ON), "exit_code": Choice(0, 1), "reason": str},
    "dynamic": Nullable({
        "model": str, "loss": str, "device": str, "calib": str, "train_examples": int, "val_examples": int,
        "tokens": int, "steps": int, "seed": int, "samples": int,
    }),
    "settings": [SETTING],
    "recommendation": Nullable({
        "setting": N_STR, "reason": str, "focus": N_STR, "base_rank": Nullable(int), "rank_pattern": {"*": int},
        "keep_finer": [str],
    }),
}
OUTCOMES = [{"rule": str, "scope": str, "layer": N_STR, "setting": N_STR,
             "status": Choice("fired", "passed", "skipped"), "message": str}]


def _kind(spec: Any) -> str:
    if isinstance(spec, dict):
        return "an object"
    if isinstance(spec, list):
        return "a list"
    if isinstance(spec, Choice):
        return " or ".join(json.dumps(v) for v in spec.values)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if isinstance(spec, tuple):
        return "a number"
    return names.get(spec, str(spec))


def _check(value: Any, spec: Any, where: str) -> None:
    if isinstance(spec, Nullable):
        if value is not None:
            _check(value, spec.spec, where)
        return
    if isinstance(spec, Choice):
        if value not in spec.values or isinstance(value, bool) != any(isinstance(v, bool) for v in spec.values):
            raise _Bad(where, f"expected {_kind(spec)}, found {json.dumps(value)[:60]}")
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _Bad(where, f"expected {_kind(spec)}")
        if "*" in spec:
            for key, item in value.items():
                _check(item, spec["*"], f"{where}.{key}")
            return
        for key, sub in spec.items():
            if key not in value:
                raise _Bad(where, f"missing key {key!r}")
            _check(value[key], sub, f"{where}.{key}" if where else key)
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise _Bad(where, f"expected {_kind(spec)}")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        raise _Bad(where, f"expected {_kind(spec)}, found {json.dumps(value)}")
    if not isinstance(value, types) or (isinstance(value, float) and not math.isfinite(value)):
        raise _Bad(where, f"expected {_kind(spec)}, found {json.dumps(value)[:60]}")


class _Bad(Exception):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where or 'document'}: {what}")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def check_document(doc: Any, source: str) -> dict[str, Any]:
    """The document if it is a hallway-audit report this version can render, else a UsageError."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tool"), dict) or doc["tool"].get("name") != "hallway-audit":
        raise UsageError(f"{source}: not a hallway-audit JSON report (no tool.name \"hallway-audit\")")
    version = doc.get("schema_version")
    major = str(version).split(".")[0]
    if not isinstance(version, str) or major != SCHEMA_VERSION.split(".")[0]:
        raise UsageError(f"{source}: report schema {version!r} is not supported (this version reads {major_of(SCHEMA_VERSION)}.x)")
    try:
        _check(doc, DOCUMENT, "")
        if "outcomes" in doc:
            _check(doc["outcomes"], OUTCOMES, "outcomes")
        if doc["gate"]["exit_code"] != (0 if doc["gate"]["passed"] else 1):
            raise _Bad("gate.exit_code", "does not agree with gate.passed")
        known = {r["id"] for r in doc["rules"]["summary"]}
        for i, item in enumerate([*doc["findings"], *doc.get("outcomes", [])]):
            if item["rule"] not in known:
                raise _Bad(f"rule {item['rule']!r}", f"not in rules.summary (item {i})")
        for fmt in doc["static"]["formats"]:
            if fmt not in doc["static"]["model"]["formats"]:
                raise _Bad("static.model.formats", f"missing format {fmt!r}")
            for layer in doc["static"]["layers"]:
                if fmt not in layer["formats"]:
                    raise _Bad(f"static.layers {layer['name']!r}", f"missing format {fmt!r}")
    except _Bad as exc:
        raise UsageError(f"{source}: malformed hallway-audit report: {exc}") from None
    return doc


def major_of(version: str) -> str:
    return version.split(".")[0]


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a saved JSON report (see check_document)."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as handle:
            raw = handle.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read the report: {exc.strerror or exc}") from exc
    if len(raw) > MAX_REPORT_BYTES:
        raise UsageError(f"{where}: larger than {MAX_REPORT_BYTES >> 20} MiB: not a hallway-audit report")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not a JSON report: not UTF-8 text (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{where}: not a JSON report: {message}") from None
    return check_document(doc, where)
