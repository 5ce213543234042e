"""The safe expression evaluator: semantics, limits, and that nothing runs code."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hallway_audit.rules import ExprError, ExprSyntaxError, parse_expr
from hallway_audit.rules.expr import MAX_EXPR_CHARS, MAX_INT_BITS


def ev(source: str, **env: object) -> object:
    return parse_expr(source).evaluate(env)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 // 2 + 7 % 2", 4),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("-x + +x", 0),
        ("1 / 4", 0.25),
        ("x * 2 - y", 1.0),
    ],
)
def test_arithmetic(source: str, expected: object) -> None:
    assert ev(source, x=1.5, y=2) == expected


def test_chained_comparisons_and_short_circuit() -> None:
    assert ev("0.1 <= x < 0.5", x=0.3) is True
    assert ev("0.1 <= x < 0.5", x=0.5) is False
    assert ev("1 < 2 > 0 != 3", ) is True
    # the second comparison's right side is never evaluated once the first fails
    assert ev("x > 1 > 1 / x", x=0) is False


def test_bool_ops_not_and_ifexp() -> None:
    assert ev("x > 0 and y > 0", x=1, y=0) is False
    assert ev("x > 0 or y > 0", x=1, y=0) is True
    assert ev("not x", x=0) is True
    assert ev("x > 0 or 1 / y > 0", x=1, y=0) is True  # short-circuit: no division
    assert ev("a if x > 0 else b", x=1, a=3, b=4) == 3
    assert ev("a if x > 0 else b", x=-1, a=3, b=4) == 4


def test_in_literal_list() -> None:
    assert ev("fmt in ['bf16', 'fp16']", fmt="bf16") is True
    assert ev("fmt not in ('bf16', 'fp16')", fmt="fp8_e4m3") is True
    assert ev("bits in [4, 8]", bits=8) is True


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("min(3, x, 2)", 1),
        ("max(3, x, 2)", 3),
        ("abs(-x)", 1),
        ("log2(8)", 3.0),
        ("log10(1000)", 3.0),
        ("sqrt(16)", 4.0),
        ("isnan(x)", False),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
    ],
)
def test_functions(source: str, expected: object) -> None:
    assert ev(source, x=1) == expected


@pytest.mark.parametrize(
    ("source", "env", "reason"),
    [
        ("x / y > 0", {"x": 1, "y": 0}, "division by zero"),
        ("x // y > 0", {"x": 1, "y": 0}, "division by zero"),
        ("x % y > 0", {"x": 1, "y": 0}, "division by zero"),
        ("log2(x) > 0", {"x": 0}, "math domain error"),
        ("sqrt(x) > 0", {"x": -1}, "math domain error"),
        ("x ** y > 0", {"x": 10.0, "y": 400}, "overflow"),
        ("x ** y > 0", {"x": 16, "y": 1024}, f"{MAX_INT_BITS} bits"),
        ("x ** y > 0", {"x": 2, "y": 5000}, "exponent"),
        ("x - x > 0", {"x": math.inf}, "NaN"),
        ("x < 1", {"x": "bf16"}, "cannot compare str and int"),
        ("x + 1 > 0", {"x": "bf16"}, "needs a number"),
        ("x * 3 == 'aaa'", {"x": "a"}, "needs a number"),
        ("round(x, y) > 0", {"x": 1, "y": 10**6}, "digits"),
        ("missing > 0", {}, "has no value"),
    ],
)
def test_runtime_errors_are_expr_errors(source: str, env: dict[str, object], reason: str) -> None:
    with pytest.raises(ExprError, match=reason):
        parse_expr(source).evaluate(env)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("__import__('os')", "call to '__import__' is not allowed"),
        ("__import__('os').system('true')", "attribute access"),
        ("().__class__", "attribute access"),
        ("().__class__.__bases__[0].__subclasses__()", "subscript"),
        ("x[0]", "subscript"),
        ("x[1:2]", "subscript"),
        ("lambda: 1", "lambda"),
        ("(lambda: 1)()", "call of a computed function"),
        ("[y for y in x]", "comprehension"),
        ("{y for y in x}", "comprehension"),
        ("(y for y in x)", "comprehension"),
        ("f'{x}'", "f-string"),
        ("(x := 1)", "assignment expression"),
        ("eval('1')", "call to 'eval' is not allowed"),
        ("open('/etc/passwd')", "call to 'open' is not allowed"),
        ("min(x, y, key=abs)", "keyword argument"),
        ("min(*x)", "starred argument"),
        ("{1: 2}", "dict literal"),
        ("{1, 2}", "set literal"),
        ("x is None", "None"),
        ("x is 1", "'is'"),
        ("~x", "'~'"),
        ("x << 2", "'<<'"),
        ("x @ y", "'@'"),
        ("1j", "complex literal"),
        ("b'x'", "bytes literal"),
        ("...", "ellipsis literal"),
        ("__x__ > 1", "dunder name"),
        ("2 ** 10 ** 10", "exponent 10000000000 exceeds"),
        ("10 ** 5000 > x", "exponent 5000 exceeds"),
        ("'a' * 10 ** 9", "needs a number"),
        ("1 / 0 < x", "division by zero"),
        ("x > 0 and [1, 2]", "list or tuple outside"),
        ("x in y", "'in' needs a literal list"),
        ("sqrt", "must be called"),
        ("sqrt(1, 2)", "takes 1 arguments"),
        ("min(1)", "takes 2+ arguments"),
        ("x +", "syntax error"),
        ("", "empty expression"),
        ("x\x00", "NUL character"),
    ],
)
def test_disallowed_constructs_rejected_at_parse(source: str, needle: str) -> None:
    with pytest.raises(ExprSyntaxError) as exc:
        parse_expr(source)
    assert any(needle in p for p in exc.value.problems), exc.value.problems


def test_size_limits() -> None:
    with pytest.raises(ExprSyntaxError, match="longer than"):
        parse_expr("x + " * MAX_EXPR_CHARS + "x")
    with pytest.raises(ExprSyntaxError, match="too complex"):
        parse_expr(" + ".join(["x"] * 200))
    with pytest.raises(ExprSyntaxError):
        parse_expr("(" * 300 + "x" + ")" * 300)
    with pytest.raises(ExprSyntaxError):
        parse_expr("-" * 900 + "x")


def test_names_in_source_order_and_functions() -> None:
    e = parse_expr("b < a + sqrt(c) and b > 0")
    assert e.names == ("b", "a", "c")
    assert e.functions == frozenset({"sqrt"})


def test_multiline_yaml_expression() -> None:
    assert parse_expr("x > 1 and\n y > 2").evaluate({"x": 2, "y": 3}) is True


def test_type_inference() -> None:
    e = parse_expr("fmt == 'bf16' and x < 1")
    t, problems = e.infer_type({"fmt": "str", "x": "num"})
    assert t == "bool" and problems == []
    t, problems = parse_expr("x + 1").infer_type({"x": "num"})
    assert t == "num"
    _, problems = parse_expr("fmt < 1").infer_type({"fmt": "str"})
    assert problems and "cannot order" in problems[0]
    _, problems = parse_expr("(x > 1) + 1").infer_type({"x": "num"})
    assert problems and "arithmetic on a condition" in problems[0]


# --- properties ------------------------------------------------------------------------

_num = st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False))


@settings(max_examples=150, deadline=None)
@given(a=_num, b=_num, op=st.sampled_from(["+", "-", "*", "<", "<=", "==", "!=", ">", ">="]))
def test_matches_python_on_safe_operators(a: float, b: float, op: str) -> None:
    expected = {"+": a + b, "-": a - b, "*": a * b, "<": a < b, "<=": a <= b, "==": a == b,
                "!=": a != b, ">": a > b, ">=": a >= b}[op]
    assert ev(f"a {op} b", a=a, b=b) == expected


_alphabet = st.sampled_from([*list("xyab01234.+-*/%<>=!()[]'\", _"), "**", "//", " and ", " or ", " not ", " in ", "sqrt(", "min(", "__", "lambda", "if", "else", ".real"])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_alphabet, max_size=30), x=_num, y=_num)
def test_arbitrary_text_only_raises_the_two_expr_errors(parts: list[str], x: float, y: float) -> None:
    source = "".join(parts)
    try:
        expr = parse_expr(source)
    except ExprSyntaxError:
        return
    with contextlib.suppress(ExprError):
        expr.evaluate({"x": x, "y": y, "a": "bf16", "b": True})


def test_python_syntax_warnings_are_errors_not_stderr_noise() -> None:
    with pytest.raises(ExprSyntaxError, match="syntax error"):
        parse_expr("1and x")
