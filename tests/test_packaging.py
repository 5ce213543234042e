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


def test_every_third_party_import_is_a_declared_dependency():
    """A module the package imports must be installed by `pip install hallway-audit`
    (transformers, for Hugging Face directories, comes with the `hf` extra; accelerate, for
    --device-map, with the `big` extra)."""
    import ast
    import sys

    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M)
    assert block
    declared = {re.split(r"[<>=\[ ]", d)[0].lower() for d in re.findall(r'"([^"]+)"', block.group(1))}
    import_names = {"pyyaml": "yaml"}
    provided = {import_names.get(d, d) for d in declared} | {"transformers", "accelerate"}  # extras, imported lazily
    imported = set()
    for path in (ROOT / "hallway_audit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("hallway_audit", "__future__")}
    assert third_party - provided == set(), f"imported but not a dependency: {sorted(third_party - provided)}"
