"""User regular expressions (--targets, plan targets and rank_pattern keys, PEFT
target_modules) checked before they are matched against module names.

Python's `re` backtracks: `(a+)+$` takes 2^n steps on n characters, and `\\w*\\w*\\w*!`
takes n^4. A pattern from a plan file or an adapter_config.json is untrusted, so it
is parsed (with the stdlib's own regex parser) and refused, before it is ever
matched, when

* it is longer than MAX_PATTERN_CHARS, or does not compile;
* a repeat (`*`, `+`, `{m,n}` with n > 1) contains another repeat or an
  alternation -- `(a+)+`, `(a*)*`, `(a|a)*`, `(.*a){20}`: the exponential shapes;
* a bounded repeat count is over MAX_REPEAT_COUNT, or it uses a backreference;
* its worst-case number of backtracking paths over a module name of
  MAX_NAME_CHARS characters is over MAX_PATHS (each unbounded repeat multiplies
  the paths by the name's length, each alternation by its branches; a search
  tries every start position): three unbounded repeats in a row are refused.

Module names longer than MAX_NAME_CHARS are not matched against a pattern at all.
With both bounds, matching one name costs at most about MAX_PATHS steps (tens of
milliseconds), whatever the pattern.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Any

from .errors import UsageError

try:  # Python 3.11+: the stdlib parser is re._parser (sre_parse is a deprecated alias)
    _p = importlib.import_module("re._parser")
    _c = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover - Python 3.10
    _p = importlib.import_module("sre_parse")
    _c = importlib.import_module("sre_constants")

MAX_PATTERN_CHARS = 4096  # a PEFT list of module names becomes one alternation of them
MAX_NAME_CHARS = 256  # module paths of real models are under 100 characters
MAX_REPEAT_COUNT = 256  # {m,n} bounds; no module name is longer than MAX_NAME_CHARS anyway
MAX_PATHS = 10**8  # backtracking paths over one name of MAX_NAME_CHARS characters

_SIMPLE = {_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN, _c.AT, _c.CATEGORY}
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | ({_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set())
_ATOMIC = getattr(_c, "ATOMIC_GROUP", None)
_SAT = MAX_PATHS * MAX_NAME_CHARS * 16  # saturate products here: no huge integers


class _Unsafe(Exception):
    pass


def _seq_paths(items: Any, length: int) -> int:
    total = 1
    for op, av in items:
        total = min(total * _item_paths(op, av, length), _SAT)
    return total


def _parts(op: Any, av: Any) -> list[Any]:
    """The sub-sequences a parsed node contains."""
    if op in _REPEATS:
        return [av[2]]
    if op is _c.SUBPATTERN:
        return [av[-1]]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    if op is _c.BRANCH:
        return list(av[1])
    if op is _ATOMIC:
        return [av]
    return []


def _has_choice(items: Any) -> bool:
    """Does this sequence contain a repeat (other than a fixed count) or an alternation?"""
    for op, av in items:
        if op is _c.BRANCH or (op in _REPEATS and av[0] != av[1]):
            return True
        if any(_has_choice(part) for part in _parts(op, av)):
            return True
    return False


def _item_paths(op: Any, av: Any, length: int) -> int:
    if op in _SIMPLE:
        return 1
    if op is _c.SUBPATTERN:
        return _seq_paths(av[-1], length)
    if op is _c.BRANCH:
        return min(sum(_seq_paths(alt, length) for alt in av[1]), _SAT)
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return _seq_paths(av[1], length)
    if op is _ATOMIC:
        return _seq_paths(av, length)
    if op in _REPEATS:
        lo, hi, body = av
        unbounded = hi == _c.MAXREPEAT
        if lo > MAX_REPEAT_COUNT or (not unbounded and hi > MAX_REPEAT_COUNT):
            raise _Unsafe(f"a repeat count over {MAX_REPEAT_COUNT}")
        if hi <= 1:  # x? : x or nothing
            return min(_seq_paths(body, length) * (2 if lo == 0 else 1), _SAT)
        if _has_choice(body):
            raise _Unsafe(
                "a repeated group that contains a repeat or an alternation (such as (a+)+, (a|b)* or (.*a){20}) "
                "can take exponential time; use a character class such as [ab]+ or a single repeat"
            )
        return max(1, min(hi, length) - lo + 1)
    if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
        raise _Unsafe("backreferences are not allowed")
    return 1


def compile_pattern(pattern: object, what: str) -> re.Pattern[str]:
    """The compiled pattern, or a UsageError '<what>: ...' saying why it is refused."""
    if not isinstance(pattern, str) or not pattern:
        raise UsageError(f"{what}: expected a non-empty regular expression string, got {type(pattern).__name__}")
    return _checked(pattern, what)


@functools.lru_cache(maxsize=512)
def _checked(pattern: str, what: str) -> re.Pattern[str]:
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UsageError(f"{what}: the regular expression is {len(pattern)} characters long, more than {MAX_PATTERN_CHARS}")
    try:
        tree = _p.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UsageError(f"{what}: {shown!r} is not a valid regular expression: {exc}") from None
    try:
        paths = MAX_NAME_CHARS * _seq_paths(tree, MAX_NAME_CHARS)
    except _Unsafe as exc:
        raise UsageError(f"{what}: regular expression {shown!r} refused: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what}: regular expression {shown!r} refused: nested too deeply") from None
    if paths > MAX_PATHS:
        raise UsageError(
            f"{what}: regular expression {shown!r} refused: it can backtrack through more than {MAX_PATHS} paths "
            f"on one module name (at most two unbounded repeats such as .* or \\w+)"
        )
    return compiled


def check_name(name: str, what: str) -> str:
    """A module name short enough to match a checked pattern against in bounded time."""
    if len(name) > MAX_NAME_CHARS:
        raise UsageError(
            f"{what}: module name {name[:60]!r}... is {len(name)} characters long; regular expressions are matched "
            f"only against names of at most {MAX_NAME_CHARS} (use all-linear, attention or mlp)"
        )
    return name
