"""Reading rule files: YAML (safe loading only), `extends`, var merging, validation.

Validation collects every problem of every file before raising, each as
`path:line: rule <id>: <problem>`, so one CI run shows all the mistakes in a rule
file rather than one per push. Line numbers come from the YAML node marks of
`yaml.SafeLoader` -- the data itself is only ever built by the safe constructor,
so a `!!python/object` tag is a load error, never code.

Combining files (several `--rules`, or `extends`):
* files are read depth first, the extended files before the file extending them;
  a file reached twice is read once; a cycle is an error;
* `vars`: later files override earlier ones (the extending file wins);
* rules: a later rule with the same id *replaces* the earlier one, keeping its
  position (semgrep-style override); `disable: [id, ...]` drops rules defined by
  files read before this one;
* names in `when`/`message` are checked against the merged vars, since those are
  the values the rules run with.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files as _resource_files
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import RuleFileError
from ..safe_load import (
    MAX_RULE_BYTES_ENV,
    BoundedLoader,
    FileProblem,
    check_size,
    max_rule_bytes,
    read_regular_file,
    yaml_problem,
)

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; importlib.abc.Traversable is deprecated there
    from importlib.resources.abc import Traversable
from .expr import ExprSyntaxError, parse_expr
from .schema import (
    REQUIRED_RULE_KEYS,
    RULE_ID,
    RULE_KEYS,
    SCOPES,
    SEVERITIES,
    TOP_LEVEL_KEYS,
    Rule,
    RuleSet,
    check_names,
    name_types,
    suggest,
    value_type,
    var_name_problem,
)
from .template import check_specs, parse_template
from .verdicts import VERDICTS

BUNDLED_PACKAGE = "hallway_audit.bundled_rules"
_YAML_SUFFIXES = (".yaml", ".yml")
_YAML11_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# --- where files come from ---------------------------------------------------------------


def _bundled_dir() -> Traversable:
    return _resource_files(BUNDLED_PACKAGE)


def bundled_rule_files() -> list[str]:
    """Names of the rule files shipped in the wheel (usable as `--rules NAME`)."""
    return sorted(
        p.name for p in _bundled_dir().iterdir() if p.is_file() and p.name.endswith(_YAML_SUFFIXES)
    )


@dataclass(frozen=True)
class _Source:
    key: str  # identity, for reading a file once and finding cycles
    display: str  # the path shown in problems and RuleSet.files
    read: Callable[[], bytes]
    dir: Traversable | Path  # where relative `extends` entries are resolved


def _path_source(path: Path) -> _Source:
    def read() -> bytes:  # regular files only, size checked before reading (safe_load)
        return read_regular_file(path, what="rule file", limit=max_rule_bytes(), limit_env=MAX_RULE_BYTES_ENV)

    return _Source(str(path.resolve()), str(path), read, path.parent)


def _bundled_source(name: str) -> _Source | None:
    base = _bundled_dir()
    for candidate in (name, *(name + s for s in _YAML_SUFFIXES)):
        trav = base.joinpath(candidate)
        if trav.is_file():
            if isinstance(trav, Path):
                return _Source(str(trav.resolve()), str(trav), trav.read_bytes, trav.parent)
            return _Source(f"bundled:{candidate}", f"<bundled>/{candidate}", trav.read_bytes, base)
    return None


def _is_bare(name: str) -> bool:
    return "/" not in name and "\\" not in name and name not in (".", "..")


def _bundled_hint() -> str:
    return f"bundled rule files: {', '.join(bundled_rule_files()) or 'none'}"


def _resolve_spec(spec: str | Path) -> _Source | str:
    """A --rules spec. A bare name of a bundled file (`default.yaml`, `strict`) is always
    the bundled file, even when the working directory holds a file of that name: a
    checked-out repository must not be able to replace the gate's rules. A local file
    is named as a path (`./default.yaml`, anything with a separator, a pathlib.Path)
    or by a bare name that is not bundled."""
    text = str(spec)
    if not isinstance(spec, Path) and _is_bare(text):
        src = _bundled_source(text)
        if src is not None:
            return src
    try:
        st = os.stat(spec)
    except (OSError, ValueError):
        if isinstance(spec, Path) and _is_bare(text):
            src = _bundled_source(text)
            if src is not None:
                return src
        return f"rule file not found ({_bundled_hint()})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a rule file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a FIFO, device or socket), not a rule file"
    return _path_source(Path(spec))


def rule_resolution_notes(specs: Sequence[str | Path]) -> list[str]:
    """A note for each bare --rules name that picked the bundled file over a local file of that name."""
    notes = []
    for spec in specs:
        text = str(spec)
        if isinstance(spec, Path) or not _is_bare(text) or _bundled_source(text) is None:
            continue
        if os.path.lexists(text):
            notes.append(
                f"--rules {text}: the bundled {text} was used, not the file {text} in the working directory "
                f"(name it ./{text} to use that file)"
            )
    return notes


def _resolve_extends(name: str, base: _Source) -> _Source | str:
    """An `extends` entry: a bare name is always a bundled file; a path is relative to `base`."""
    if _is_bare(name):
        src = _bundled_source(name)
        if src is not None:
            return src
        sibling = base.dir.joinpath(name)
        hint = f"; for the file next to this one write './{name}'" if sibling.is_file() else ""
        return f"extends: {name!r} is not a bundled rule file ({_bundled_hint()}){hint}"
    if os.path.isabs(name):
        path = Path(name)
    elif isinstance(base.dir, Path):
        path = Path(os.path.normpath(base.dir / name))
    else:  # a relative path from a bundled file inside a zip: stay inside the bundle
        trav = base.dir.joinpath(name)
        if trav.is_file():
            return _Source(f"bundled:{name}", f"<bundled>/{name}", trav.read_bytes, base.dir)
        return f"extends: {name!r} not found"
    if path.is_file():
        return _path_source(path)
    return f"extends: {name!r} not found (looked for {path})"


# --- parsed files ---------------------------------------------------------------------------


@dataclass
class _RawRule:
    file: str
    line: int
    label: str  # the id, or '#N' when it has none
    data: dict[str, object]
    lines: dict[str, int]


@dataclass
class _RawFile:
    src: _Source
    extends: list[tuple[str, int]] = field(default_factory=list)
    vars: list[tuple[str, object, int]] = field(default_factory=list)
    disable: list[tuple[str, int]] = field(default_factory=list)
    rules: list[_RawRule] = field(default_factory=list)


@dataclass(order=True)
class _Problem:
    file_order: int
    line: int
    text: str = field(compare=False)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _key_lines(node: yaml.MappingNode) -> dict[str, int]:
    return {k.value: _line(k) for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _duplicate_keys(node: yaml.Node) -> list[tuple[str, int, int]]:
    """(key, first line, duplicate line) for repeated keys; YAML silently keeps the last."""
    if not isinstance(node, yaml.MappingNode):
        return []
    seen: dict[str, int] = {}
    dups = []
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
            continue
        if k.value in seen:
            dups.append((k.value, seen[k.value], _line(k)))
        else:
            seen[k.value] = _line(k)
    return dups


class _Loader:
    def __init__(self) -> None:
        self.problems: list[_Problem] = []
        self.order: dict[str, int] = {}
        self.files: list[_RawFile] = []
        self.done: set[str] = set()
        self.stack: list[_Source] = []

    # -- problems
    def problem(self, display: str, line: int | None, text: str, label: str | None = None) -> None:
        order = self.order.setdefault(display, len(self.order))
        where = f"{display}:{line}" if line is not None else display
        rule = f" rule {label}:" if label is not None else ""
        self.problems.append(_Problem(order, line or 0, f"{where}:{rule} {text}"))

    # -- reading
    def load(self, src: _Source, via: tuple[str, int] | None = None) -> None:
        if any(s.key == src.key for s in self.stack):
            start = next(i for i, s in enumerate(self.stack) if s.key == src.key)
            chain = " -> ".join([s.display for s in self.stack[start:]] + [src.display])
            display, line = via or (src.display, 1)
            self.problem(display, line, f"extends cycle: {chain}")
            return
        if src.key in self.done:
            return
        self.order.setdefault(src.display, len(self.order))
        self.stack.append(src)
        raw = self.parse(src)
        if raw is not None:
            for name, line in raw.extends:
                child = _resolve_extends(name, src)
                if isinstance(child, str):
                    self.problem(src.display, line, child)
                else:
                    self.load(child, via=(src.display, line))
        self.stack.pop()
        self.done.add(src.key)
        if raw is not None:
            self.files.append(raw)

    def parse(self, src: _Source) -> _RawFile | None:
        d = src.display
        try:
            blob = src.read()
        except OSError as exc:
            self.problem(d, None, f"cannot read rule file: {exc.strerror or exc}")
            return None
        except FileProblem as exc:
            self.problem(d, exc.line, exc.message)
            return None
        limit = max_rule_bytes()
        if len(blob) > limit:
            self.problem(d, None, f"rule file larger than the limit of {limit} bytes (set {MAX_RULE_BYTES_ENV} to raise it)")
            return None
        try:
            text = blob.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.problem(d, None, f"rule file is not UTF-8 text ({exc.reason} at byte {exc.start})")
            return None
        loader = BoundedLoader(text)  # SafeLoader bounded in depth; check_size bounds alias expansion
        try:
            node = loader.get_single_node()
            if node is not None:
                check_size(node)
            dups = self._raw_duplicates(node)
            data = loader.construct_document(node) if node is not None else None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{d}:{mark.line + 1}:{mark.column + 1}:" if mark else f"{d}:"
            context = f" ({exc.context})" if exc.context and exc.problem else ""
            self.problems.append(
                _Problem(self.order.setdefault(d, len(self.order)), mark.line + 1 if mark else 0,
                         f"{where} malformed YAML: {exc.problem or exc.context}{context}")
            )
            return None
        except yaml.YAMLError as exc:
            self.problem(d, None, f"malformed YAML: {exc}")
            return None
        except RecursionError:
            self.problem(d, None, "malformed YAML: nested too deeply")
            return None
        except FileProblem as exc:
            self.problem(d, exc.line, exc.message)
            return None
        except (ValueError, TypeError, OverflowError) as exc:  # a scalar the constructor cannot build
            self.problem(d, None, yaml_problem(exc).message)
            return None
        finally:
            loader.dispose()
        for where_label, key, first, line in dups:
            self.problem(d, line, f"duplicate key {key!r} (first at line {first})", where_label)
        if node is None or data is None:
            self.problem(d, 1, "empty rule file: expected a mapping with 'rules' (and optionally 'vars', 'extends')")
            return None
        if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
            self.problem(d, _line(node), f"top level must be a mapping with 'rules', got {type(data).__name__}")
            return None
        raw = _RawFile(src)
        nodes = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        for key, line in _key_lines(node).items():
            if key not in TOP_LEVEL_KEYS:
                self.problem(d, line, f"unknown top-level key {key!r}{suggest(key, TOP_LEVEL_KEYS)} (allowed: {', '.join(TOP_LEVEL_KEYS)})")
        for key in data:
            if not isinstance(key, str):
                self.problem(d, _line(node), f"top-level key {key!r} must be a string")
        if "extends" in data:
            raw.extends = self._string_list(d, data["extends"], nodes["extends"], "extends")
        if "disable" in data:
            raw.disable = self._string_list(d, data["disable"], nodes["disable"], "disable")
        if "vars" in data:
            self._vars(raw, data["vars"], nodes["vars"])
        if "rules" in data:
            self._rules(raw, data["rules"], nodes["rules"])
        elif not raw.extends:
            self.problem(d, 1, "no 'rules' and no 'extends': nothing to load")
        return raw

    def _raw_duplicates(self, node: yaml.Node | None) -> list[tuple[str | None, str, int, int]]:
        """Duplicate keys at top level, in vars and in each rule, before merge keys are flattened."""
        out: list[tuple[str | None, str, int, int]] = []
        if not isinstance(node, yaml.MappingNode):
            return out
        out += [(None, k, a, b) for k, a, b in _duplicate_keys(node)]
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                continue
            if k.value == "vars":
                out += [(None, f"vars.{kk}", a, b) for kk, a, b in _duplicate_keys(v)]
            elif k.value == "rules" and isinstance(v, yaml.SequenceNode):
                for i, item in enumerate(v.value):
                    label = f"#{i + 1}"
                    if isinstance(item, yaml.MappingNode):
                        for ik, iv in item.value:
                            if isinstance(ik, yaml.ScalarNode) and ik.value == "id" and isinstance(iv, yaml.ScalarNode):
                                label = iv.value
                    out += [(label, kk, a, b) for kk, a, b in _duplicate_keys(item)]
        return out

    def _string_list(self, d: str, value: object, node: yaml.Node, key: str) -> list[tuple[str, int]]:
        if isinstance(value, str):
            return [(value, _line(node))]
        if not isinstance(value, list) or not isinstance(node, yaml.SequenceNode):
            self.problem(d, _line(node), f"{key} must be a list of strings, got {type(value).__name__}")
            return []
        out = []
        for item, item_node in zip(value, node.value, strict=True):
            if isinstance(item, str) and item.strip():
                out.append((item.strip(), _line(item_node)))
            else:
                self.problem(d, _line(item_node), f"{key} entries must be non-empty strings, got {item!r}")
        return out

    def _vars(self, raw: _RawFile, value: object, node: yaml.Node) -> None:
        d = raw.src.display
        if value is None:
            return
        if not isinstance(value, dict) or not isinstance(node, yaml.MappingNode):
            self.problem(d, _line(node), f"vars must be a mapping of name: value, got {type(value).__name__}")
            return
        lines = _key_lines(node)
        value_nodes = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        for name, given in value.items():
            line = lines.get(name, _line(node)) if isinstance(name, str) else _line(node)
            vnode = value_nodes.get(name)
            v = given
            if isinstance(v, str) and isinstance(vnode, yaml.ScalarNode) and vnode.style is None and _YAML11_FLOAT.fullmatch(v):
                v = float(v)  # YAML 1.1 reads an unquoted 1e-4 as a string; nobody means that
            bad = var_name_problem(name)
            if bad:
                self.problem(d, line, bad)
            elif isinstance(v, (bool, int, str)):
                raw.vars.append((name, v, line))
            elif isinstance(v, float):
                if math.isnan(v):
                    self.problem(d, line, f"var {name!r} is NaN: every comparison with it would be false")
                else:
                    raw.vars.append((name, v, line))
            else:
                self.problem(d, line, f"var {name!r} must be a number, string or bool, got {type(v).__name__} {v!r}")

    def _rules(self, raw: _RawFile, value: object, node: yaml.Node) -> None:
        d = raw.src.display
        if value is None:
            return
        if not isinstance(value, list) or not isinstance(node, yaml.SequenceNode):
            self.problem(d, _line(node), f"rules must be a list of rules, got {type(value).__name__}")
            return
        seen: dict[str, int] = {}
        for i, (item, item_node) in enumerate(zip(value, node.value, strict=True)):
            line = _line(item_node)
            label = f"#{i + 1}"
            if not isinstance(item, dict) or not isinstance(item_node, yaml.MappingNode):
                self.problem(d, line, f"a rule must be a mapping with {', '.join(REQUIRED_RULE_KEYS)}; got {type(item).__name__}", label)
                continue
            lines = _key_lines(item_node)
            rid = item.get("id")
            if isinstance(rid, str) and rid:
                label = rid
                if rid in seen:
                    self.problem(d, lines.get("id", line), f"duplicate id {rid!r} (first defined at line {seen[rid]})", label)
                    continue
                seen[rid] = line
            raw.rules.append(_RawRule(d, line, label, item, lines))

    # -- combining
    def merge(self) -> tuple[dict[str, object], dict[str, _RawRule]]:
        vars: dict[str, object] = {}
        origin: dict[str, str] = {}
        rules: dict[str, _RawRule] = {}
        for f in self.files:
            d = f.src.display
            for name, v, line in f.vars:
                if name in vars and value_type(vars[name]) != value_type(v):
                    self.problem(
                        d, line,
                        f"var {name!r} is a {_TYPE_WORDS[value_type(vars[name])]} in {origin[name]} "
                        f"but is overridden with a {_TYPE_WORDS[value_type(v)]} {v!r}",
                    )
                    continue
                vars[name] = v
                origin[name] = d
            for rid, line in f.disable:
                if rid in rules:
                    del rules[rid]
                else:
                    self.problem(d, line, f"disable: no rule {rid!r} defined before this file{suggest(rid, rules)}")
            for r in f.rules:
                if RULE_ID.fullmatch(r.label):
                    rules[r.label] = r
        return vars, rules

    def check_rule(self, r: _RawRule, vars: dict[str, object]) -> Rule | None:
        d, label, data, lines = r.file, r.label, r.data, r.lines
        n0 = len(self.problems)

        def bad(key: str | None, text: str) -> None:
            self.problem(d, lines.get(key, r.line) if key else r.line, text, label)

        for key in data:
            if key not in RULE_KEYS:
                bad(str(key), f"unknown key {key!r}{suggest(str(key), RULE_KEYS)} (allowed: {', '.join(RULE_KEYS)})")
        for key in REQUIRED_RULE_KEYS:
            if key not in data or data[key] is None:
                bad(None, f"missing required key {key!r}")
        rid = data.get("id")
        if rid is not None and not (isinstance(rid, str) and RULE_ID.fullmatch(rid)):
            bad("id", f"id {rid!r} must be a string of letters, digits, '-', '_' or '.' (at most 128)")
        scope = data.get("scope")
        if scope is not None and scope not in SCOPES:
            bad("scope", f"scope must be one of {', '.join(SCOPES)}, got {scope!r}{suggest(str(scope), SCOPES)}")
        severity = data.get("severity")
        if severity is not None and severity not in SEVERITIES:
            bad("severity", f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}{suggest(str(severity), SEVERITIES)}")
        verdict = data.get("verdict")
        if verdict is not None and (not isinstance(verdict, str) or verdict not in VERDICTS):
            bad("verdict", f"unknown verdict {verdict!r}{suggest(str(verdict), VERDICTS)} (known: {', '.join(VERDICTS)})")
        meta = data.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            bad("metadata", f"metadata must be a mapping, got {type(meta).__name__}")
        scope_ok = scope in SCOPES

        when = data.get("when")
        if when is not None:
            if not isinstance(when, str):
                bad("when", f"when must be an expression string, got {type(when).__name__} {when!r} (quote it)")
            else:
                try:
                    expr = parse_expr(when)
                except ExprSyntaxError as exc:
                    for p in exc.problems:
                        bad("when", f"when: {p}")
                else:
                    name_problems = check_names(expr.names, str(scope) if scope_ok else None, vars)
                    for p in name_problems:
                        bad("when", f"when: {p}")
                    if scope_ok and not name_problems:
                        result, type_problems = expr.infer_type(name_types(str(scope), vars))
                        for p in type_problems:
                            bad("when", f"when: {p}")
                        if result not in ("bool", "any"):
                            bad("when", f"when must be a condition such as 'nonfinite > 0', not a {_TYPE_WORDS[result]}: {when!r}")

        message = data.get("message")
        if message is not None:
            if not isinstance(message, str):
                bad("message", f"message must be a string, got {type(message).__name__}")
            else:
                template, problems = parse_template(message)
                for p in problems:
                    bad("message", p)
                if not problems:
                    name_problems = check_names(template.names, str(scope) if scope_ok else None, vars, template=True)
                    for p in name_problems:
                        bad("message", f"message: {p}")
                    if scope_ok and not name_problems:
                        for p in check_specs(template, name_types(str(scope), vars, template=True)):
                            bad("message", p)

        if len(self.problems) > n0:
            return None
        try:
            return Rule(
                id=str(rid), scope=scope, when=str(when), severity=severity, verdict=str(verdict),  # type: ignore[arg-type]
                message=str(message), metadata=dict(meta) if isinstance(meta, dict) else {}, source=f"{d}:{r.line}",
            )
        except RuleFileError as exc:  # pragma: no cover - the checks above are a superset
            for p in exc.problems:
                self.problem(d, r.line, p)
            return None


_TYPE_WORDS = {"num": "number", "str": "string", "bool": "bool", "list": "list", "any": "value"}


def _finish(loader: _Loader) -> RuleSet:
    vars, merged = loader.merge()
    built: dict[int, Rule] = {}
    for f in loader.files:
        for r in f.rules:
            rule = loader.check_rule(r, vars)
            if rule is not None:
                built[id(r)] = rule
    if loader.problems:
        raise RuleFileError([p.text for p in sorted(loader.problems)])
    return RuleSet(
        rules=tuple(built[id(r)] for r in merged.values()),
        vars=vars,
        files=tuple(f.src.display for f in loader.files),
    )


def load_rules(specs: Sequence[str | Path] | str | Path) -> RuleSet:
    """Load, combine and validate rule files; raises RuleFileError listing every problem.

    Each spec is a path, or the bare name of a bundled file (`default.yaml`, or
    `default`); an existing file of that name in the working directory wins.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    loader = _Loader()
    for spec in specs:
        src = _resolve_spec(spec)
        if isinstance(src, str):
            loader.problem(str(spec), None, src)
        else:
            loader.load(src)
    return _finish(loader)


def loads_rules(text: str, name: str = "<string>") -> RuleSet:
    """Load rules from YAML text (tests, embedded plans); relative extends resolve from the cwd."""
    blob = text.encode("utf-8")
    loader = _Loader()
    loader.load(_Source(f"string:{name}", name, lambda: blob, Path.cwd()))
    return _finish(loader)


def validate_rule_files(paths: Sequence[str | Path] | str | Path) -> list[str]:
    """Every problem `load_rules(paths)` would raise, or [] (for `hallway-audit rules validate`)."""
    try:
        load_rules(paths)
    except RuleFileError as exc:
        return exc.problems
    return []

