"""A small, safe evaluator for rule `when` expressions.

Rule files come from pull requests and shared repositories, so an expression must
never run code: it is parsed with `ast.parse(mode="eval")`, every node is checked
against a whitelist at load time, and the checked tree is turned into nested Python
closures, one per node, that evaluation calls (no eval, exec or compile-to-code).
Everything a hostile or careless expression could use to
burn CPU or memory is capped: source length, node count, exponents, integer size,
string arithmetic (not allowed at all) and `round` digits.

Runtime failures (division by zero, math domain errors, overflow, a NaN result)
raise `ExprError`; the rule evaluator reports the rule as *skipped* with that
reason for the subject, never as passed.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

MAX_EXPR_CHARS = 1000
MAX_NODES = 256
MAX_EXPONENT = 1024
MAX_INT_BITS = 4096
MAX_ROUND_DIGITS = 20

Type = Literal["num", "str", "bool", "list", "any"]


class ExprSyntaxError(Exception):
    """The expression is malformed or uses a construct outside the whitelist."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ExprError(Exception):
    """Evaluation failed for this input (the rule is skipped, with this reason)."""


# --- functions ---------------------------------------------------------------------


def _num(value: object, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExprError(f"{what} needs a number, got {type(value).__name__} {value!r}")
    return value


def _round(x: object, ndigits: object = None) -> int | float:
    x = _num(x, "round()")
    if ndigits is None:
        return round(x)
    nd = _num(ndigits, "round()")
    if not isinstance(nd, int) or abs(nd) > MAX_ROUND_DIGITS:
        raise ExprError(f"round() digits must be an integer in [-{MAX_ROUND_DIGITS}, {MAX_ROUND_DIGITS}]")
    return round(x, nd)


@dataclass(frozen=True)
class Function:
    min_args: int
    max_args: int | None  # None: unbounded
    returns: Type
    impl: Callable[..., object]


def _numeric(fn: Callable[..., object], name: str) -> Callable[..., object]:
    def wrapped(*args: object) -> object:
        return fn(*(_num(a, f"{name}()") for a in args))

    return wrapped


FUNCTIONS: dict[str, Function] = {
    "min": Function(2, None, "num", _numeric(min, "min")),
    "max": Function(2, None, "num", _numeric(max, "max")),
    "abs": Function(1, 1, "num", _numeric(abs, "abs")),
    "log2": Function(1, 1, "num", _numeric(math.log2, "log2")),
    "log10": Function(1, 1, "num", _numeric(math.log10, "log10")),
    "sqrt": Function(1, 1, "num", _numeric(math.sqrt, "sqrt")),
    "isnan": Function(1, 1, "bool", _numeric(math.isnan, "isnan")),
    "round": Function(1, 2, "num", _round),
}

# --- operators ---------------------------------------------------------------------


def _check_int(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise ExprError(f"integer result larger than {MAX_INT_BITS} bits")
    if isinstance(value, float) and math.isnan(value):
        raise ExprError("result is NaN")
    return value


def _pow(a: int | float, b: int | float) -> int | float:
    if abs(b) > MAX_EXPONENT:
        raise ExprError(f"exponent {b!r} exceeds the limit of {MAX_EXPONENT}")
    if isinstance(a, int) and isinstance(b, int) and b >= 0:
        if abs(a) > 1 and a.bit_length() * b > MAX_INT_BITS:
            raise ExprError(f"integer result larger than {MAX_INT_BITS} bits")
        return a**b
    return math.pow(a, b)  # float pow: never complex, raises on domain/overflow


_BINOPS: dict[type, tuple[str, Callable[[int | float, int | float], int | float]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", _pow),
}

_CMPOPS: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.In: ("in", lambda a, b: a in b),
    ast.NotIn: ("not in", lambda a, b: a not in b),
}
_ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)

# Friendly names for constructs outside the whitelist, so the error says what to change.
_FORBIDDEN: dict[type, str] = {
    ast.Attribute: "attribute access ('.')",
    ast.Subscript: "subscript ('[...]')",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.NamedExpr: "assignment expression (':=')",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.Dict: "dict literal",
    ast.Set: "set literal",
    ast.Starred: "starred argument",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slice",
}
_OP_NAMES: dict[type, str] = {
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Invert: "~",
    ast.Is: "is",
    ast.IsNot: "is not",
}


# --- the compiled expression ---------------------------------------------------------


class Expr:
    """A parsed, whitelisted expression; `names` are its free names in source order."""

    __slots__ = ("_fn", "functions", "names", "source", "tree")

    def __init__(self, source: str, tree: ast.Expression, names: tuple[str, ...], functions: frozenset[str]) -> None:
        self.source = source
        self.tree = tree
        self.names = names
        self.functions = functions
        self._fn = _compile(tree.body)

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expr) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)

    def evaluate(self, env: Mapping[str, object]) -> object:
        """Value of the expression; raises ExprError (never anything else) on failure."""
        try:
            return self._fn(env)
        except ExprError:
            raise
        except ZeroDivisionError:
            raise ExprError("division by zero") from None
        except OverflowError:
            raise ExprError("numeric overflow") from None
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise ExprError(str(exc) or type(exc).__name__) from None
        except RecursionError:  # pragma: no cover - MAX_NODES keeps depth small
            raise ExprError("expression nested too deeply") from None

    def test(self, env: Mapping[str, object]) -> bool:
        return bool(self.evaluate(env))

    def infer_type(self, name_types: Mapping[str, Type]) -> tuple[Type, list[str]]:
        """Static type of the result plus type problems (e.g. `format < 3`)."""
        checker = _TypeChecker(self.source, name_types)
        return checker.visit(self.tree.body), checker.problems


def parse_expr(source: str) -> Expr:
    """Parse and whitelist-check `source`; raises ExprSyntaxError listing every problem."""
    if not isinstance(source, str):
        raise ExprSyntaxError([f"expression must be a string, got {type(source).__name__}"])
    text = source.replace("\r", " ").replace("\n", " ").strip()
    if not text:
        raise ExprSyntaxError(["empty expression"])
    if "\x00" in text:
        raise ExprSyntaxError(["expression contains a NUL character"])
    if len(text) > MAX_EXPR_CHARS:
        raise ExprSyntaxError([f"expression longer than {MAX_EXPR_CHARS} characters"])
    try:
        with warnings.catch_warnings():
            # e.g. "1and x": ambiguous source is an error here, not a warning on stderr
            warnings.simplefilter("error")
            tree = ast.parse(text, mode="eval")
    except SyntaxWarning as exc:
        raise ExprSyntaxError([f"syntax error: {exc}"]) from None
    except SyntaxError as exc:
        col = f" at column {exc.offset}" if exc.offset else ""
        raise ExprSyntaxError([f"syntax error{col}: {exc.msg}"]) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ExprSyntaxError([f"cannot parse expression: {type(exc).__name__}"]) from None
    count = sum(1 for _ in ast.walk(tree))  # iterative: safe before any recursive walk
    if count > MAX_NODES:
        raise ExprSyntaxError([f"expression too complex ({count} nodes, limit {MAX_NODES})"])
    checker = _StructureChecker(text)
    checker.visit(tree.body)
    problems = checker.problems
    if not problems:
        problems = _fold_constants(text, tree)
    if problems:
        raise ExprSyntaxError(problems)
    names = tuple(dict.fromkeys(n.id for n in sorted(checker.names, key=lambda n: (n.lineno, n.col_offset))))
    return Expr(text, tree, names, frozenset(checker.functions))


# --- load-time checks ------------------------------------------------------------------


def _seg(source: str, node: ast.AST) -> str:
    return ast.get_source_segment(source, node) or type(node).__name__


class _StructureChecker:
    """Collects every construct outside the whitelist, not just the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self.names: list[ast.Name] = []
        self.functions: set[str] = set()

    def bad(self, what: str, node: ast.AST) -> None:
        self.problems.append(f"{what} is not allowed: {_seg(self.source, node)!r}")

    def visit(self, node: ast.AST, *, list_ok: bool = False) -> None:
        if isinstance(node, ast.Constant):
            v = node.value
            if v is None:
                self.bad("None", node)
            elif not isinstance(v, (bool, int, float, str)):
                self.bad(f"{type(v).__name__} literal", node)
        elif isinstance(node, ast.Name):
            if node.id.startswith("__"):
                self.bad(f"dunder name {node.id!r}", node)
            elif node.id in FUNCTIONS:
                self.problems.append(f"function {node.id!r} must be called, e.g. {node.id}(x)")
            else:
                self.names.append(node)
        elif isinstance(node, ast.BoolOp):
            for operand in node.values:
                self.visit(operand)
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) in _OP_NAMES:
                self.bad(f"operator {_OP_NAMES[type(node.op)]!r}", node)
            self.visit(node.operand)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                self.bad(f"operator {_OP_NAMES.get(type(node.op), type(node.op).__name__)!r}", node)
            self.visit(node.left)
            self.visit(node.right)
        elif isinstance(node, ast.Compare):
            self.visit(node.left)
            for op, right in zip(node.ops, node.comparators, strict=True):
                if type(op) not in _CMPOPS:
                    self.bad(f"comparison {_OP_NAMES.get(type(op), type(op).__name__)!r} (use == or !=)", node)
                is_in = isinstance(op, (ast.In, ast.NotIn))
                if is_in and not isinstance(right, (ast.List, ast.Tuple)):
                    self.problems.append(
                        f"'in' needs a literal list on its right, e.g. format in ['bf16', 'fp16']: {_seg(self.source, node)!r}"
                    )
                self.visit(right, list_ok=is_in)
        elif isinstance(node, ast.IfExp):
            self.visit(node.test)
            self.visit(node.body)
            self.visit(node.orelse)
        elif isinstance(node, (ast.List, ast.Tuple)):
            if not list_ok:
                self.bad("list or tuple outside the right side of 'in'", node)
            for elt in node.elts:
                self.visit(elt)
        elif isinstance(node, ast.Call):
            self.visit_call(node)
        elif type(node) in _FORBIDDEN:
            self.bad(_FORBIDDEN[type(node)], node)
            if isinstance(node, (ast.Attribute, ast.Subscript)):
                self.visit(node.value)  # report what it was applied to, e.g. __import__(...)
        else:
            self.bad(type(node).__name__, node)

    def visit_call(self, node: ast.Call) -> None:
        func = node.func
        if not isinstance(func, ast.Name):
            self.bad("call of a computed function", node)
            self.visit(func)
            for arg in node.args:
                self.visit(arg)
            return
        spec = FUNCTIONS.get(func.id)
        if spec is None:
            self.problems.append(
                f"call to {func.id!r} is not allowed (functions: {', '.join(FUNCTIONS)}): {_seg(self.source, node)!r}"
            )
        if node.keywords:
            self.bad("keyword argument", node)
        if spec is not None:
            self.functions.add(func.id)
            n = len(node.args)
            hi = spec.max_args
            if n < spec.min_args or (hi is not None and n > hi):
                want = str(spec.min_args) if hi == spec.min_args else f"{spec.min_args}{'+' if hi is None else f'-{hi}'}"
                self.problems.append(f"{func.id}() takes {want} arguments, got {n}")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.bad("starred argument", arg)
            else:
                self.visit(arg)


def _has_name(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) for n in ast.walk(node))


def _fold_constants(source: str, tree: ast.Expression) -> list[str]:
    """Evaluate name-free subexpressions now, so `2 ** 10 ** 10` or `1 / 0` fail at load."""
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and not _has_name(node.right):
            try:
                exp = _compile(node.right)({})
            except Exception:
                exp = 0
            if isinstance(exp, (int, float)) and abs(exp) > MAX_EXPONENT:
                problems.append(f"exponent {exp!r} exceeds the limit of {MAX_EXPONENT}: {_seg(source, node)!r}")
                continue
        if isinstance(node, (ast.BinOp, ast.Call, ast.UnaryOp)) and not _has_name(node):
            try:
                Expr(source, ast.Expression(body=node), (), frozenset()).evaluate({})
            except ExprError as exc:
                problems.append(f"{_seg(source, node)!r} cannot be evaluated: {exc}")
    return list(dict.fromkeys(problems))


class _TypeChecker:
    def __init__(self, source: str, name_types: Mapping[str, Type]) -> None:
        self.source = source
        self.name_types = name_types
        self.problems: list[str] = []

    def visit(self, node: ast.AST) -> Type:
        if isinstance(node, ast.Constant):
            v = node.value
            return "bool" if isinstance(v, bool) else "str" if isinstance(v, str) else "num"
        if isinstance(node, ast.Name):
            return self.name_types.get(node.id, "any")
        if isinstance(node, ast.UnaryOp):
            t = self.visit(node.operand)
            if isinstance(node.op, ast.Not):
                return "bool"
            self.need_num(t, node)
            return "num"
        if isinstance(node, ast.BinOp):
            self.need_num(self.visit(node.left), node)
            self.need_num(self.visit(node.right), node)
            return "num"
        if isinstance(node, ast.BoolOp):
            for operand in node.values:
                self.visit(operand)
            return "bool"
        if isinstance(node, ast.Compare):
            left = self.visit(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.In, ast.NotIn)) and isinstance(right_node, (ast.List, ast.Tuple)):
                    for elt in right_node.elts:
                        self.compare(left, self.visit(elt), op, node)
                    left = "list"
                    continue
                right = self.visit(right_node)
                self.compare(left, right, op, node)
                left = right
            return "bool"
        if isinstance(node, ast.IfExp):
            self.visit(node.test)
            a, b = self.visit(node.body), self.visit(node.orelse)
            return a if a == b else "any"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            for arg in node.args:
                self.need_num(self.visit(arg), node)
            return FUNCTIONS[node.func.id].returns
        return "any"

    def need_num(self, t: Type, node: ast.AST) -> None:
        if t in ("str", "bool", "list"):
            kind = {"str": "a string", "bool": "a condition", "list": "a list"}[t]
            self.problems.append(f"arithmetic on {kind} is not allowed: {_seg(self.source, node)!r}")

    def compare(self, a: Type, b: Type, op: ast.cmpop, node: ast.AST) -> None:
        if "any" in (a, b):
            return
        if isinstance(op, _ORDERING):
            if a != b or a not in ("num", "str"):
                self.problems.append(f"cannot order {a} and {b}: {_seg(self.source, node)!r}")
        elif {a, b} == {"num", "str"}:
            self.problems.append(f"comparing a number with a string is always false: {_seg(self.source, node)!r}")


# --- evaluation --------------------------------------------------------------------------


# Each node is compiled once, at parse time, into a closure that does exactly what a
# walk of the tree would do at that node (same operations, same order, same errors):
# a rule runs on every layer of a checkpoint, so per-evaluation dispatch on node types
# was most of the cost of a 10^5-layer audit.

Compiled = Callable[[Mapping[str, object]], object]


def _compile(node: ast.AST) -> Compiled:
    """A closure evaluating a tree that `_StructureChecker` accepted; anything else is a
    bug, not input, and raises ExprError when evaluated."""
    if isinstance(node, ast.Constant):
        value = node.value
        return lambda env: value
    if isinstance(node, ast.Name):
        return _compile_name(node.id)
    if isinstance(node, ast.BoolOp):
        return _compile_boolop(node)
    if isinstance(node, ast.UnaryOp):
        return _compile_unary(node)
    if isinstance(node, ast.BinOp):
        return _compile_binop(node)
    if isinstance(node, ast.Compare):
        return _compile_compare(node)
    if isinstance(node, ast.IfExp):
        test, body, orelse = _compile(node.test), _compile(node.body), _compile(node.orelse)
        return lambda env: body(env) if test(env) else orelse(env)
    if isinstance(node, (ast.List, ast.Tuple)):
        elts = [_compile(e) for e in node.elts]
        return lambda env: [e(env) for e in elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        impl = FUNCTIONS[node.func.id].impl
        args = [_compile(a) for a in node.args]
        return lambda env: _check_int(impl(*[a(env) for a in args]))
    kind = type(node).__name__

    def unsupported(env: Mapping[str, object]) -> object:  # pragma: no cover
        raise ExprError(f"unsupported construct {kind}")

    return unsupported


def _compile_name(name: str) -> Compiled:
    def lookup(env: Mapping[str, object]) -> object:
        try:
            return env[name]
        except KeyError:
            raise ExprError(f"name {name!r} has no value") from None

    return lookup


def _compile_boolop(node: ast.BoolOp) -> Compiled:
    parts = [_compile(v) for v in node.values]
    if isinstance(node.op, ast.And):
        return lambda env: all(part(env) for part in parts)
    return lambda env: any(part(env) for part in parts)


def _compile_unary(node: ast.UnaryOp) -> Compiled:
    operand = _compile(node.operand)
    if isinstance(node.op, ast.Not):
        return lambda env: not operand(env)
    if isinstance(node.op, ast.USub):
        return lambda env: -_num(operand(env), "unary minus")
    return lambda env: +_num(operand(env), "unary plus")


def _compile_binop(node: ast.BinOp) -> Compiled:
    sym, fn = _BINOPS[type(node.op)]
    what = f"'{sym}'"
    left, right = _compile(node.left), _compile(node.right)

    def binop(env: Mapping[str, object]) -> object:
        a = _num(left(env), what)
        return _check_int(fn(a, _num(right(env), what)))

    return binop


def _compare_error(left: object, right: object, sym: str) -> ExprError:
    return ExprError(f"cannot compare {type(left).__name__} and {type(right).__name__} with '{sym}'")


def _compile_compare(node: ast.Compare) -> Compiled:
    first = _compile(node.left)
    ops = [(*_CMPOPS[type(op)], _compile(right)) for op, right in zip(node.ops, node.comparators, strict=True)]
    if len(ops) == 1:  # the common `metric > threshold`
        sym, fn, second = ops[0]

        def compare_one(env: Mapping[str, object]) -> object:
            left = first(env)
            right = second(env)
            try:
                ok = fn(left, right)
            except TypeError:
                raise _compare_error(left, right, sym) from None
            return bool(ok)

        return compare_one

    def compare_chain(env: Mapping[str, object]) -> object:
        left = first(env)
        for sym, fn, compiled in ops:
            right = compiled(env)
            try:
                ok = fn(left, right)
            except TypeError:
                raise _compare_error(left, right, sym) from None
            if not ok:
                return False
            left = right
        return True

    return compare_chain
