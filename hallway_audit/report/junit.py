"""JUnit XML: each rule x subject a test case, so CI systems show the gate as tests.

A fired rule is a <failure> only when it gates (severity at or above --fail-on, and
not a probed setting waived because another setting of the sweep passes); other
fired rules pass with their message in <system-out>, so the XML and the exit code
always agree. Rules whose metrics were not measured are <skipped>.

Rendered from the document's `outcomes`. Every string from a checkpoint, plan or
rule file goes through escape.visible: characters XML 1.0 forbids (most control
characters) cannot appear raw, and names stay on one line in CI views.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from .base import Formatter, RenderOptions, register_formatter
from .escape import visible
from .rows import Doc, gates


def _case_name(outcome: Mapping[str, Any]) -> str:
    where = outcome["layer"] or "(model)"
    return visible(f"{where} [{outcome['setting']}]" if outcome["setting"] else where)


@register_formatter
class JunitFormatter(Formatter):
    name = "junit"
    machine = True
    suffix = ".xml"

    def render_document(self, doc: Doc, options: RenderOptions) -> str:
        if "outcomes" not in doc:
            raise UsageError(
                f"a schema {doc.get('schema_version')} report has no per-subject outcomes (added in schema 1.3): "
                "re-run the audit for JUnit"
            )
        rules = {r["id"]: r for r in doc["rules"]["summary"]}
        root = ET.Element("testsuites", name="hallway-audit")
        suites: dict[str, ET.Element] = {}
        totals = {"tests": 0, "failures": 0, "skipped": 0}
        per_suite: dict[str, dict[str, int]] = {}
        for o in doc["outcomes"]:
            rid = o["rule"]
            rule = rules[rid]
            if rid not in suites:
                suites[rid] = ET.SubElement(root, "testsuite", name=visible(rid))
                per_suite[rid] = {"tests": 0, "failures": 0, "skipped": 0}
            case = ET.SubElement(suites[rid], "testcase", classname=visible(f"hallway-audit.{rid}"), name=_case_name(o))
            per_suite[rid]["tests"] += 1
            message = visible(o["message"])
            if gates(doc, o, rule["severity"]):
                failure = ET.SubElement(case, "failure", type=visible(rule["severity"]), message=message)
                failure.text = f"{visible(rule['verdict'])}: {message}\nrule {visible(rid)} ({visible(rule['source'])})"
                per_suite[rid]["failures"] += 1
            elif o["status"] == "fired":
                ET.SubElement(case, "system-out").text = f"{visible(rule['severity'])}: {message}"
            elif o["status"] == "skipped":
                ET.SubElement(case, "skipped", message=message)
                per_suite[rid]["skipped"] += 1
        for rid, suite in suites.items():
            for key, value in per_suite[rid].items():
                suite.set(key, str(value))
                totals[key] += value
        for key, value in totals.items():
            root.set(key, str(value))
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
