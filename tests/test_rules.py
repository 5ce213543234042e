"""Rule files: loading, extends, and one test per validation problem.

Every problem must name the file, the line and (for rule problems) the rule id,
because that is what a CI log shows and what the user fixes.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hallway_audit.errors import ExitCode, RuleFileError
from hallway_audit.metrics import METRICS
from hallway_audit.rules import (
    VERDICTS,
    bundled_rule_files,
    load_rules,
    loads_rules,
    validate_rule_files,
)

GOOD_RULE = """\
  - id: {id}
    scope: layer
    when: psi < 0.5
    severity: error
    verdict: needs_higher_rank
    message: "{{layer}}: psi {{psi:.0%}}"
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str, name: str = "r.yaml") -> list[str]:
    return validate_rule_files([write(tmp_path, name, text)])


def one(problems: list[str], needle: str) -> str:
    hits = [p for p in problems if needle in p]
    assert hits, f"no problem containing {needle!r} in {problems}"
    return hits[0]


def rule_yaml(**fields: str) -> str:
    base = {
        "id": "r1",
        "scope": "layer",
        "when": "psi < 0.5",
        "severity": "error",
        "verdict": "needs_higher_rank",
        "message": '"{layer}: psi {psi:.0%}"',
    }
    base.update(fields)
    body = "".join(f"    {k}: {v}\n" for k, v in base.items() if v is not None)
    return "rules:\n  - " + body[4:]


# --- bundled files ------------------------------------------------------------------------


def test_bundled_files_are_listed_and_valid() -> None:
    names = bundled_rule_files()
    assert {"default.yaml", "strict.yaml"} <= set(names)
    for name in names:
        assert validate_rule_files([name]) == [], name


def test_default_rules_shape() -> None:
    rs = load_rules(["default.yaml"])
    assert rs.vars["psi_target"] == 0.9
    assert rs.vars["saturated_max"] == pytest.approx(1e-4)
    ids = [r.id for r in rs]
    assert len(ids) == len(set(ids))
    assert all(r.verdict in VERDICTS for r in rs)
    nonfinite = rs.get("nonfinite-weights")
    assert nonfinite is not None and not nonfinite.per_setting and nonfinite.phase == "static"
    assert rs.get("weights-cannot-move").per_setting  # type: ignore[union-attr]
    assert {r.phase for r in rs} == {"static", "dynamic"}
    assert rs.get("gradient-escapes-rank").phase == "dynamic"  # type: ignore[union-attr]
    assert rs.files[0].endswith("default.yaml")
    assert ":" in nonfinite.source and nonfinite.source.startswith(rs.files[0])


def test_bundled_name_without_suffix_and_strict_extends_default() -> None:
    rs = load_rules(["strict"])
    assert [Path(f).name for f in rs.files] == ["default.yaml", "strict.yaml"]
    default = load_rules(["default.yaml"])
    assert rs.vars["psi_target"] == 0.95 > default.vars["psi_target"]
    # strict replaces open-field in place (same position), as an error
    assert [r.id for r in rs] == [r.id for r in default]
    assert rs.get("open-field").severity == "error"  # type: ignore[union-attr]
    assert default.get("open-field").severity == "info"  # type: ignore[union-attr]


def test_missing_rule_file_raises_with_exit_code(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError) as exc:
        load_rules([tmp_path / "nope.yaml"])
    assert exc.value.exit_code == ExitCode.RULES == 4
    assert "nope.yaml" in exc.value.problems[0] and "default.yaml" in exc.value.problems[0]
    with pytest.raises(RuleFileError):
        load_rules(["no-such-bundled.yaml"])


def test_bundled_name_wins_over_a_local_file_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checked-out repository cannot replace the gate's rules by holding a default.yaml:
    the bare name is the bundled file; the local file is used when named as a path."""
    write(tmp_path, "default.yaml", "rules:\n" + GOOD_RULE.format(id="local-only"))
    write(tmp_path, "mine.yaml", "rules:\n" + GOOD_RULE.format(id="mine-only"))
    monkeypatch.chdir(tmp_path)
    bundled = load_rules(["default.yaml"])
    assert "local-only" not in [r.id for r in bundled] and "nonfinite-weights" in [r.id for r in bundled]
    assert [r.id for r in load_rules(["./default.yaml"])] == ["local-only"]
    assert [r.id for r in load_rules([tmp_path / "default.yaml"])] == ["local-only"]
    assert [r.id for r in load_rules(["mine.yaml"])] == ["mine-only"]  # not a bundled name: the local file


# --- extends and combining ----------------------------------------------------------------


def test_extends_bundled_overrides_vars_and_replaces_rule(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mine.yaml",
        """\
        extends: [default.yaml]
        vars:
          psi_target: 0.97
          extra_threshold: 3
        disable: [quantization-noise]
        rules:
          - id: nonfinite-weights
            scope: layer
            when: nonfinite > extra_threshold
            severity: warning
            verdict: fix_weights
            message: "{layer}: {nonfinite} bad weights"
        """,
    )
    rs = load_rules([path])
    assert rs.vars["psi_target"] == 0.97 and rs.vars["beta_pred_warn"] == 0.5
    assert rs.vars["extra_threshold"] == 3
    assert rs.get("quantization-noise") is None
    r = rs.get("nonfinite-weights")
    assert r is not None and r.severity == "warning" and r.source.startswith(str(path))
    assert rs.rules[0].id == "nonfinite-weights"  # replaced in place


def test_extends_relative_path_and_several_specs(tmp_path: Path) -> None:
    write(tmp_path, "base/base.yaml", "vars:\n  t: 0.5\n  u: 1\nrules:\n" + GOOD_RULE.format(id="base-rule"))
    top = write(tmp_path, "team/top.yaml", "extends: [../base/base.yaml]\nvars:\n  t: 0.7\n")
    other = write(tmp_path, "other.yaml", "vars:\n  u: 2\nrules:\n" + GOOD_RULE.format(id="other-rule"))
    rs = load_rules([top, other])
    assert dict(rs.vars) == {"t": 0.7, "u": 2}
    assert [r.id for r in rs] == ["base-rule", "other-rule"]
    assert [Path(f).name for f in rs.files] == ["base.yaml", "top.yaml", "other.yaml"]


def test_later_file_rule_replaces_earlier(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "rules:\n" + GOOD_RULE.format(id="x") + GOOD_RULE.format(id="y"))
    b = write(tmp_path, "b.yaml", "rules:\n" + GOOD_RULE.format(id="x").replace("error", "info"))
    rs = load_rules([a, b])
    assert [r.id for r in rs] == ["x", "y"]
    assert rs.get("x").severity == "info" and rs.get("x").source.startswith(str(b))  # type: ignore[union-attr]


def test_diamond_extends_reads_shared_file_once(tmp_path: Path) -> None:
    write(tmp_path, "l.yaml", "extends: [default.yaml]\nvars: {psi_target: 0.8}\n")
    write(tmp_path, "r.yaml", "extends: [default.yaml]\nvars: {p_t_min: 0.6}\n")
    top = write(tmp_path, "top.yaml", "extends: [./l.yaml, ./r.yaml]\n")
    rs = load_rules([top])
    assert [Path(f).name for f in rs.files] == ["default.yaml", "l.yaml", "r.yaml", "top.yaml"]
    assert rs.vars["psi_target"] == 0.8 and rs.vars["p_t_min"] == 0.6


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "extends: [./b.yaml]\nrules:\n" + GOOD_RULE.format(id="ra"))
    write(tmp_path, "b.yaml", "vars: {t: 1}\nextends:\n  - ./a.yaml\n")
    problems = validate_rule_files([tmp_path / "a.yaml"])
    p = one(problems, "cycle")
    assert "b.yaml:3:" in p and "a.yaml -> " in p and "b.yaml -> " in p


def test_extends_self_cycle(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, "extends: [./r.yaml]\n"), "cycle")
    assert p.startswith(str(tmp_path / "r.yaml") + ":1:")


def test_extends_missing_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "rules: []\nextends:\n  - nosuch.yaml\n  - ./nosuch.yaml\n")
    assert "r.yaml:3:" in one(problems, "'nosuch.yaml' is not a bundled rule file")
    assert "r.yaml:4:" in one(problems, "'./nosuch.yaml' not found")


def test_extends_bare_name_is_bundled_only_with_hint(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "rules:\n" + GOOD_RULE.format(id="b"))
    p = one(problems_of(tmp_path, "extends: [base.yaml]\n"), "not a bundled rule file")
    assert "'./base.yaml'" in p


# --- validation problems: file, line and rule id --------------------------------------------


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "rules:\n  - id: x\n    when: [unclosed\n")
    assert len(problems) == 1
    assert "r.yaml:" in problems[0] and "malformed YAML" in problems[0]
    line = int(problems[0].split("r.yaml:")[1].split(":")[0])
    assert line >= 3


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    assert "r.yaml:1:" in one(problems_of(tmp_path, "- id: x\n"), "top level must be a mapping")


def test_empty_file(tmp_path: Path) -> None:
    assert "r.yaml:1:" in one(problems_of(tmp_path, "# only a comment\n"), "empty rule file")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, "rules: []\nvar:\n  x: 1\n"), "unknown top-level key 'var'")
    assert "r.yaml:2:" in p and "did you mean 'vars'" in p


def test_missing_id(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(id=None)), "missing required key 'id'")
    assert "r.yaml:2: rule #1:" in p


def test_missing_other_required_keys(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, rule_yaml(when=None, message=None))
    assert "r.yaml:2: rule r1:" in one(problems, "missing required key 'when'")
    assert "rule r1" in one(problems, "missing required key 'message'")


def test_bad_id(tmp_path: Path) -> None:
    assert "r.yaml:2: rule has space:" in one(problems_of(tmp_path, rule_yaml(id='"has space"')), "must be a string of letters")


def test_duplicate_id_in_one_file(tmp_path: Path) -> None:
    text = "rules:\n" + GOOD_RULE.format(id="dup") + GOOD_RULE.format(id="dup")
    p = one(problems_of(tmp_path, text), "duplicate id 'dup'")
    assert "r.yaml:8: rule dup:" in p and "first defined at line 2" in p


def test_bad_scope(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(scope="layr")), "scope must be one of")
    assert "r.yaml:3: rule r1:" in p and "did you mean 'layer'" in p


def test_bad_severity(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(severity="fatal")), "severity must be one of")
    assert "r.yaml:5: rule r1:" in p


def test_unknown_verdict(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(verdict="needs_higher_rnk")), "unknown verdict")
    assert "r.yaml:6: rule r1:" in p and "did you mean 'needs_higher_rank'" in p


def test_unknown_metric_with_suggestion(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(when="psii < 0.5")), "unknown metric")
    assert "r.yaml:4: rule r1:" in p and "'psii'" in p and "did you mean 'psi'" in p


def test_metric_not_available_at_scope(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(when="p_t < 0.5")), "not available at scope 'layer'")
    assert "r.yaml:4: rule r1:" in p and "'p_t'" in p


def test_context_name_not_at_scope(tmp_path: Path) -> None:
    text = rule_yaml(scope="model", when="layer == 'x'", message="m")
    assert "r.yaml:4: rule r1:" in one(problems_of(tmp_path, text), "'layer' is not defined at scope 'model'")


def test_expression_syntax_error(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(when='"psi < < 0.5"')), "syntax error")
    assert "r.yaml:4: rule r1:" in p


def test_expression_not_a_string(tmp_path: Path) -> None:
    assert "r.yaml:4: rule r1:" in one(problems_of(tmp_path, rule_yaml(when="true")), "when must be an expression string")


def test_expression_must_be_a_condition(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(when="psi - 0.5")), "when must be a condition")
    assert "r.yaml:4: rule r1:" in p


def test_expression_type_errors(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, rule_yaml(when="\"format < 3 or psi + format > 1 or format == 3\""))
    assert "r.yaml:4: rule r1:" in one(problems, "cannot order str and num")
    assert "rule r1" in one(problems, "arithmetic on a string")
    assert "rule r1" in one(problems, "comparing a number with a string")


@pytest.mark.parametrize(
    ("when", "construct"),
    [
        ("\"__import__('os').system('ls') == 0\"", "call to '__import__' is not allowed"),
        ('"().__class__ == 1"', "attribute access"),
        ('"psi[0] < 1"', "subscript"),
        ('"(lambda: 1)() == 1"', "lambda"),
        ('"psi < 2 ** 10 ** 10"', "exponent"),
        ('"psi < eval(\'1\')"', "call to 'eval' is not allowed"),
        ('"(x := psi) > 0"', "assignment expression"),
        ('"psi in {1, 2}"', "'in' needs a literal list"),
        ('"psi < min(psi, key=psi)"', "keyword argument"),
    ],
)
def test_disallowed_constructs_are_load_errors(tmp_path: Path, when: str, construct: str) -> None:
    p = one(problems_of(tmp_path, rule_yaml(when=when)), construct)
    assert "r.yaml:4: rule r1: when:" in p


def test_unknown_template_field(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, rule_yaml(message='"{layerr}: {psi}"')), "unknown metric or var 'layerr'")
    assert "r.yaml:7: rule r1:" in p and "did you mean 'layer'" in p


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ('"{layer.__class__}"', "only plain names"),
        ('"{layer[0]}"', "only plain names"),
        ('"{psi!r}"', "conversions"),
        ('"{}"', "must name a value"),
        ('"{0}"', "must name a value"),
        ('"{psi:>999}"', "width 999 exceeds"),
        ('"{psi:{psi}}"', "nested fields"),
        ('"{layer:.1%}"', "does not fit a str"),
        ('"{psi:zz}"', "invalid format spec"),
        ('"unbalanced {psi"', "message template"),
        ('"{p_t}"', "not available at scope 'layer'"),
    ],
)
def test_bad_template_fields(tmp_path: Path, message: str, needle: str) -> None:
    p = one(problems_of(tmp_path, rule_yaml(message=message)), needle)
    assert "r.yaml:7: rule r1:" in p


def test_unknown_rule_key_and_duplicate_key(tmp_path: Path) -> None:
    text = rule_yaml() + "    sevrity: error\n    scope: model\n"
    problems = problems_of(tmp_path, text)
    assert "r.yaml:8: rule r1:" in one(problems, "unknown key 'sevrity'")
    assert "did you mean 'severity'" in one(problems, "unknown key 'sevrity'")
    assert "r.yaml:9: rule r1:" in one(problems, "duplicate key 'scope' (first at line 3)")


def test_rule_not_a_mapping(tmp_path: Path) -> None:
    assert "r.yaml:2: rule #1:" in one(problems_of(tmp_path, "rules:\n  - just a string\n"), "a rule must be a mapping")


def test_rules_not_a_list(tmp_path: Path) -> None:
    assert "r.yaml:1:" in one(problems_of(tmp_path, "rules: {a: 1}\n"), "rules must be a list")


def test_metadata_must_be_mapping(tmp_path: Path) -> None:
    assert "r.yaml:8: rule r1:" in one(problems_of(tmp_path, rule_yaml(metadata="[1, 2]")), "metadata must be a mapping")


def test_vars_must_be_scalars(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "vars:\n  a: [1, 2]\n  b: {c: 1}\n  n: null\n  nan: .nan\n  ok: 1\nrules: []\n")
    assert "r.yaml:2:" in one(problems, "var 'a' must be a number, string or bool")
    assert "r.yaml:3:" in one(problems, "var 'b' must be")
    assert "r.yaml:4:" in one(problems, "var 'n' must be")
    assert "r.yaml:5:" in one(problems, "var 'nan' is NaN")


def test_vars_must_not_shadow_metrics_or_builtins(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "vars:\n  beta_min: 0.1\n  format: x\n  sqrt: 1\n  '1x': 2\nrules: []\n")
    assert "r.yaml:2:" in one(problems, "shadows the metric 'beta_min'")
    assert "r.yaml:3:" in one(problems, "var 'format' shadows")
    assert "r.yaml:4:" in one(problems, "var 'sqrt' shadows")
    assert "r.yaml:5:" in one(problems, "must be an identifier")


def test_vars_must_not_change_type_on_override(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, "extends: [default.yaml]\nvars:\n  psi_target: high\n"), "overridden with a string")
    assert "r.yaml:3:" in p and "psi_target" in p and "default.yaml" in p


def test_unquoted_exponent_float_var_is_a_number(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "extends: [default]\nvars:\n  saturated_max: 1e-4\n  label: '1e-4'\n")
    rs = load_rules([path])
    assert rs.vars["saturated_max"] == 1e-4 and rs.vars["label"] == "1e-4"


def test_unknown_var_in_expression_is_reported(tmp_path: Path) -> None:
    text = "vars:\n  psi_floor: 0.5\n" + rule_yaml(when="psi < psi_flor")
    assert "did you mean 'psi_floor'" in one(problems_of(tmp_path, text), "unknown metric or var 'psi_flor'")


def test_disable_unknown_rule(tmp_path: Path) -> None:
    p = one(problems_of(tmp_path, "extends: [default.yaml]\ndisable: [open-feld]\n"), "disable: no rule 'open-feld'")
    assert "r.yaml:2:" in p and "did you mean 'open-field'" in p


def test_python_object_tag_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    text = f"""\
    vars:
      x: !!python/object/apply:os.system ["touch {marker}"]
    rules: []
    """
    problems = problems_of(tmp_path, text)
    assert not marker.exists()
    assert len(problems) == 1 and "r.yaml:2:" in problems[0] and "malformed YAML" in problems[0]
    assert "python/object" in problems[0]


def test_python_name_tag_is_rejected(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "rules: !!python/name:os.system\n")
    assert "r.yaml:1:" in one(problems, "malformed YAML")


def test_every_problem_is_collected_at_once(tmp_path: Path) -> None:
    text = """\
    colour: red
    rules:
      - id: a
        scope: layr
        when: psii < 1
        severity: fatal
        verdict: nope
        message: "{nope}"
      - id: b
        scope: model
        when: p_t < 0.5
        severity: error
        verdict: open_field
        message: "{p_tt}"
    """
    path = write(tmp_path, "many.yaml", text)
    with pytest.raises(RuleFileError) as exc:
        load_rules([path])
    problems = exc.value.problems
    assert len(problems) == 7, problems
    assert all(p.startswith(str(path) + ":") for p in problems)
    assert "(and 6 more)" in str(exc.value)
    # sorted by line
    lines = [int(p[len(str(path)) + 1 :].split(":")[0]) for p in problems]
    assert lines == sorted(lines)


def test_problems_in_an_extended_file_name_that_file(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", rule_yaml(scope="layr"))
    problems = validate_rule_files([write(tmp_path, "top.yaml", "extends: [./base.yaml]\n")])
    assert "base.yaml:3: rule r1:" in one(problems, "scope must be one of")


def test_loads_rules_from_string() -> None:
    rs = loads_rules(rule_yaml(), name="inline.yaml")
    assert rs.rules[0].source == "inline.yaml:2"
    with pytest.raises(RuleFileError) as exc:
        loads_rules(rule_yaml(severity="bad"), name="inline.yaml")
    assert exc.value.problems[0].startswith("inline.yaml:5: rule r1:")


def test_metric_registry_names_are_all_usable() -> None:
    for name, metric in METRICS.items():
        scope = metric.scopes[0]
        rs = loads_rules(rule_yaml(scope=scope, when=f"{name} == {name}", message=f'"{{{name}}}"'))
        assert rs.rules[0].names == frozenset({name})


def test_yaml_anchors_and_merge_keys_are_supported(tmp_path: Path) -> None:
    text = """\
    rules:
      - &base
        id: a
        scope: layer
        when: psi < 0.5
        severity: error
        verdict: needs_higher_rank
        message: "{layer}"
      - <<: *base
        id: b
        severity: warning
    """
    rs = load_rules([write(tmp_path, "r.yaml", text)])
    assert [(r.id, r.severity) for r in rs] == [("a", "error"), ("b", "warning")]
    assert rs.get("b").source.endswith("r.yaml:9")  # type: ignore[union-attr]
