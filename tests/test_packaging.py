"""The wheel ships every subpackage: pyproject.toml lists packages by hand (the bundled
rules are mapped from rules/), and a package left out installs a tool that cannot import."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M)
    assert block, "pyproject.toml has no [tool.setuptools] packages list"
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hallway_audit").rglob("__init__.py")}
    assert found - listed == set(), f"not shipped in the wheel: {sorted(found - listed)}"
