"""The definitions a reader needs live in the repository (docs/definitions.md).

Code, tests, rule files and the README cite `docs/definitions.md §N`; these tests
fail when a citation points at a section that does not exist, when the sections
are renumbered out of order (which silently breaks citations), or when anything
the package ships or the README cites a specification outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = ROOT / "docs" / "definitions.md"

# Where citations may appear (text files only; the tiny example's weights are binary).
CITING = ("hallway_audit", "tests", "bench", "rules", "examples", "docs")
CITING_FILES = ("README.md", "CHANGELOG.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".toml", ".sh", ".cfg", ".json"}

# Anything that points outside the repository for its definitions.
EXTERNAL = ("SPEC.md", "../shared", "shared/seed")

_HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s+\S", re.MULTILINE)
# "docs/definitions.md §4.2", "... §6.2, §6.3", "... §4 to §6", "... §3.5 (x), §7.1"
_CITATION = re.compile(r"definitions\.md((?:[\s,;]*(?:and|to|or)?\s*§\s*\d+(?:\.\d+)*(?:\s*\([^()\n]*\))?)+)")
_SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")


def headings(text: str) -> list[str]:
    """Section numbers of the numbered headings, in document order."""
    return _HEADING.findall(text)


def cited(text: str) -> list[str]:
    """Every section number cited as docs/definitions.md §N in `text`."""
    return [n for m in _CITATION.finditer(text) for n in _SECTION.findall(m.group(1))]


def _text_files() -> list[Path]:
    files = [ROOT / name for name in CITING_FILES if (ROOT / name).is_file()]
    for top in CITING:
        base = ROOT / top
        if base.is_dir():
            files += sorted(
                p for p in base.rglob("*")
                if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
            )
    return files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def test_citation_parser_reads_every_form() -> None:
    """The parser the other tests rely on: single, listed, ranged and annotated citations."""
    assert cited("See docs/definitions.md §2.") == ["2"]
    assert cited("Proposals (docs/definitions.md §6.2, §6.3):") == ["6.2", "6.3"]
    assert cited("(docs/definitions.md §4 to §6)") == ["4", "6"]
    assert cited('{definition: "docs/definitions.md §3.5 (beta_pred), §7.1 (beta > 0)"}') == ["3.5", "7.1"]
    assert cited("docs/definitions.md\n§5.7: means") == ["5.7"]
    assert cited("SPEC §4 and §5") == []
    assert headings("## 1. Notation\n### 1.2 Cells\n#### 1.2.3 x\n# Title\n") == ["1", "1.2", "1.2.3"]


def test_sections_are_numbered_in_order() -> None:
    """Top-level sections count 1, 2, 3...; each subsection N.k follows N.(k-1) under N."""
    nums = headings(_read(DEFINITIONS))
    assert nums, "docs/definitions.md has no numbered headings"
    expected_top = 0
    last_seen: list[int] = []
    for n in nums:
        parts = [int(p) for p in n.split(".")]
        if len(parts) == 1:
            expected_top += 1
            assert parts[0] == expected_top, f"section {n} after {expected_top - 1}"
        else:
            parent, k = parts[:-1], parts[-1]
            if last_seen[: len(parent)] == parent and len(last_seen) > len(parent):
                assert k == last_seen[len(parent)] + 1, f"section {n} after {'.'.join(map(str, last_seen))}"
            else:
                assert last_seen == parent, f"section {n} is not under {'.'.join(map(str, last_seen))}"
                assert k == 1, f"section {n} does not start at .1"
        last_seen = parts
    assert len(set(nums)) == len(nums), "duplicate section numbers"


def test_every_cited_section_exists() -> None:
    """Each `docs/definitions.md §N` in code, tests, rules, bench, README (and the
    file's own `§N` cross-references) names a heading of docs/definitions.md."""
    text = _read(DEFINITIONS)
    known = set(headings(text))
    missing = []
    for path in _text_files():
        rel = path.relative_to(ROOT)
        body = _read(path)
        numbers = _SECTION.findall(body) if path == DEFINITIONS else cited(body)
        missing += [f"{rel}: §{n}" for n in numbers if n not in known]
    assert not missing, "cited sections missing from docs/definitions.md:\n" + "\n".join(missing)


def test_package_and_readme_cite_nothing_outside_the_repository() -> None:
    """No file of the package, the bundled rules or the README points at SPEC.md or the
    project's shared folder: a reader of the repository could not follow it."""
    paths = [ROOT / "README.md"]
    for top in ("hallway_audit", "rules"):
        paths += sorted(p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in paths
        for i, line in enumerate(_read(p).splitlines(), 1)
        if any(marker in line for marker in EXTERNAL)
    ]
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize("where", ["hallway_audit", "rules", "README.md"])
def test_no_spec_section_citations(where: str) -> None:
    """`SPEC §N` (the old external specification) is replaced by docs/definitions.md §N."""
    base = ROOT / where
    paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in paths
        for i, line in enumerate(_read(p).splitlines(), 1)
        if re.search(r"\bSPEC\s*§", line)
    ]
    assert not offenders, "cite docs/definitions.md §N instead:\n" + "\n".join(offenders)
