"""JUnit XML: each rule x subject a test case, so CI systems show the gate as tests.

A fired rule is a <failure> only when it gates (severity at or above --fail-on, and
not a probed setting waived because another setting of the sweep passes); other
fired rules pass with their message in <system-out>, so the XML and the exit code
always agree. Rules whose metrics were not measured are <skipped>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from .base import Formatter, RenderOptions, register_formatter


def _case_name(outcome) -> str:
    s = outcome.subject
    where = s.layer or "(model)"
    return f"{where} [{s.setting}]" if s.setting else where


@register_formatter
class JunitFormatter(Formatter):
    name = "junit"
    machine = True
    suffix = ".xml"

    def render(self, result, options: RenderOptions) -> str:
        root = ET.Element("testsuites", name="hallway-audit")
        suites: dict[str, ET.Element] = {}
        totals = {"tests": 0, "failures": 0, "skipped": 0}
        per_suite: dict[str, dict[str, int]] = {}
        for o in result.outcomes:
            rid = o.rule.id
            if rid not in suites:
                suites[rid] = ET.SubElement(root, "testsuite", name=rid)
                per_suite[rid] = {"tests": 0, "failures": 0, "skipped": 0}
            case = ET.SubElement(suites[rid], "testcase", classname=f"hallway-audit.{rid}", name=_case_name(o))
            per_suite[rid]["tests"] += 1
            if result.gate.gates(o):
                failure = ET.SubElement(case, "failure", type=o.rule.severity, message=o.message)
                failure.text = f"{o.rule.verdict}: {o.message}\nrule {rid} ({o.rule.source})"
                per_suite[rid]["failures"] += 1
            elif o.status == "fired":
                ET.SubElement(case, "system-out").text = f"{o.rule.severity}: {o.message}"
            elif o.status == "skipped":
                ET.SubElement(case, "skipped", message=o.message)
                per_suite[rid]["skipped"] += 1
        for rid, suite in suites.items():
            for key, value in per_suite[rid].items():
                suite.set(key, str(value))
                totals[key] += value
        for key, value in totals.items():
            root.set(key, str(value))
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
