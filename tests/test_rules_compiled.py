"""Rule expressions are compiled into closures once; evaluating them must do exactly
what walking the checked tree does (value, type, short-circuit, and the ExprError
message), which `_reference` below does the way the evaluator did before it was
compiled."""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hallway_audit.rules import ExprError, ExprSyntaxError, parse_expr
from hallway_audit.rules.expr import _BINOPS, _CMPOPS, FUNCTIONS, _check_int, _num


def _walk(node: ast.AST, env: Mapping[str, object]) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        try:
            return env[node.id]
        except KeyError:
            raise ExprError(f"name {node.id!r} has no value") from None
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(bool(_walk(v, env)) for v in node.values)
        return any(bool(_walk(v, env)) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        v = _walk(node.operand, env)
        if isinstance(node.op, ast.Not):
            return not v
        v = _num(v, "unary minus" if isinstance(node.op, ast.USub) else "unary plus")
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp):
        sym, fn = _BINOPS[type(node.op)]
        a = _num(_walk(node.left, env), f"'{sym}'")
        b = _num(_walk(node.right, env), f"'{sym}'")
        return _check_int(fn(a, b))
    if isinstance(node, ast.Compare):
        left = _walk(node.left, env)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _walk(right_node, env)
            sym, cmp = _CMPOPS[type(op)]
            try:
                ok = cmp(left, right)
            except TypeError:
                raise ExprError(f"cannot compare {type(left).__name__} and {type(right).__name__} with '{sym}'") from None
            if not ok:
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _walk(node.body, env) if _walk(node.test, env) else _walk(node.orelse, env)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_walk(e, env) for e in node.elts]
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return _check_int(FUNCTIONS[node.func.id].impl(*(_walk(a, env) for a in node.args)))


def _reference(tree: ast.Expression, env: Mapping[str, object]) -> tuple[str, object]:
    """('ok', value) or ('error', message), with Expr.evaluate's mapping of exceptions."""
    try:
        return "ok", _walk(tree.body, env)
    except ExprError as exc:
        return "error", str(exc)
    except ZeroDivisionError:
        return "error", "division by zero"
    except OverflowError:
        return "error", "numeric overflow"
    except (ValueError, TypeError, ArithmeticError) as exc:
        return "error", str(exc) or type(exc).__name__


def _compiled(source: str, env: Mapping[str, object]) -> tuple[str, object]:
    try:
        return "ok", parse_expr(source).evaluate(env)
    except ExprError as exc:
        return "error", str(exc)


NAMES = ("x", "y", "s", "missing")
atoms = st.one_of(
    st.sampled_from(NAMES),
    st.integers(-5, 300).map(str),
    st.sampled_from(["0.5", "1e-3", "2.0", "0", "'bf16'", "'x'", "True", "False"]),
)


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binop = st.tuples(children, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), children)
    compare = st.tuples(children, st.lists(st.tuples(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), children),
                                           min_size=1, max_size=3))
    return st.one_of(
        binop.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        compare.map(lambda t: "(" + t[0] + "".join(f" {op} {c}" for op, c in t[1]) + ")"),
        st.tuples(children, st.sampled_from(["and", "or"]), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        children.map(lambda c: f"(not {c})"),
        children.map(lambda c: f"(-{c})"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.tuples(st.sampled_from(["abs", "sqrt", "log2", "log10", "isnan", "round"]), children).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(["min", "max"]), children, children).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(children, st.sampled_from(["in", "not in"])).map(lambda t: f"({t[0]} {t[1]} ['bf16', 1, 0.5])"),
    )


expressions = st.recursive(atoms, _combine, max_leaves=8)
values = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from(["bf16", "fp8_e4m3", ""]), st.booleans())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=expressions, x=values, y=values, s=values)
def test_compiled_expressions_evaluate_as_the_tree_walk(source: str, x: object, y: object, s: object) -> None:
    try:
        expr = parse_expr(source)
    except ExprSyntaxError:
        return  # refused at load time (a constant part fails, too complex): nothing to evaluate
    env = {"x": x, "y": y, "s": s}
    want, got = _reference(expr.tree, env), _compiled(source, env)
    if want[0] == "ok" and isinstance(want[1], float) and math.isnan(want[1]):
        assert got[0] == "ok" and isinstance(got[1], float) and math.isnan(got[1])
        return
    assert got == want and type(got[1]) is type(want[1])


def test_short_circuits_skip_what_would_fail() -> None:
    env = {"x": 0, "y": "bf16"}
    for source, want in [
        ("x != 0 and 1 / x > 1", False),          # 'and' stops at the first false
        ("x == 0 or 1 / x > 1", True),            # 'or' at the first true
        ("1 > 2 > 1 / x", False),                 # a chain at its first false link
        ("1 if x == 0 else 1 / x", 1),            # only the branch taken
    ]:
        assert parse_expr(source).evaluate(env) == want, source
    for source, message in [
        ("x < y", "cannot compare int and str with '<'"),
        ("-1 < x < y", "cannot compare int and str with '<'"),
        ("-y", "unary minus needs a number, got str 'bf16'"),
        ("missing > 0", "name 'missing' has no value"),
        ("y + 1 / x", "'+' needs a number, got str 'bf16'"),  # the left operand is checked before the right runs
    ]:
        with pytest.raises(ExprError) as info:
            parse_expr(source).evaluate(env)
        assert str(info.value) == message, source
