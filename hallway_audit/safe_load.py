"""Reading the small files a user hands the audit (plan YAML, PEFT config, rule files) within bounds.

These files are untrusted input (a plan in a pull request, a config from a model
hub). Reading one must not hang or exhaust memory, whatever it is:

* only regular files are read: a FIFO, /dev/zero, a device or a directory is
  refused from its stat, before it is opened for reading (and the open itself is
  non-blocking, so a file swapped for a FIFO in between cannot block it);
* the size is checked before reading, and again while reading;
* YAML goes through `BoundedLoader`, a `yaml.SafeLoader` (plain data only, never
  code) that limits nesting depth while composing, and refuses a document whose
  alias-expanded size is over the node limit before anything is constructed --
  the "billion laughs" document is a few hundred bytes whose expansion is
  10^9 nodes;
* JSON nesting is limited the same way.

Every refusal is a `FileProblem` with one line of text; the caller prefixes the
path and raises its own error class (exit 2 for plans and configs, 4 for rules).
"""

from __future__ import annotations

import json
import os
import stat

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from .limits import env_int

MAX_PLAN_BYTES_ENV = "HALLWAY_AUDIT_MAX_PLAN_BYTES"
MAX_PLAN_BYTES_DEFAULT = 1 << 20  # plan YAML and PEFT adapter_config.json
MAX_RULE_BYTES_ENV = "HALLWAY_AUDIT_MAX_RULE_BYTES"
MAX_RULE_BYTES_DEFAULT = 1 << 20  # one rule file (the bundled default.yaml is 10 KB)
MAX_YAML_NODES_ENV = "HALLWAY_AUDIT_MAX_YAML_NODES"
MAX_YAML_NODES_DEFAULT = 100_000  # nodes after alias expansion (default.yaml: about 250)
MAX_DEPTH = 64  # nesting of YAML and JSON collections; real plans and rule files use 4


class FileProblem(Exception):
    """Why a file was refused, as one line without the path (the caller adds it with `at`)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line = message, line

    def at(self, display: str) -> str:
        """'path:line: message' (or 'path: message' when no line is known)."""
        return f"{display}:{self.line}: {self.message}" if self.line is not None else f"{display}: {self.message}"


def max_plan_bytes() -> int:
    return env_int(MAX_PLAN_BYTES_ENV, MAX_PLAN_BYTES_DEFAULT)


def max_rule_bytes() -> int:
    return env_int(MAX_RULE_BYTES_ENV, MAX_RULE_BYTES_DEFAULT)


def max_yaml_nodes() -> int:
    return env_int(MAX_YAML_NODES_ENV, MAX_YAML_NODES_DEFAULT)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular_file(path: str | os.PathLike[str], *, what: str, limit: int, limit_env: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is a FileProblem."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem(f"{what} not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise FileProblem(f"cannot read the {what}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"is {_kind(st.st_mode)}, not a {what} (only regular files are read)")
    too_big = f"larger than the limit of {limit} bytes for a {what} (set {limit_env} to raise it)"
    if st.st_size > limit:
        raise FileProblem(f"{st.st_size} bytes, {too_big}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileProblem(f"cannot read the {what}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the stat and the open
            raise FileProblem(f"is not a regular file, not a {what} (only regular files are read)")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise FileProblem(f"cannot read the {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise FileProblem(too_big)
    return b"".join(chunks)


def decode_text(blob: bytes, what: str) -> str:
    """UTF-8 (a BOM is dropped), or a FileProblem naming the byte."""
    try:
        return blob.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"the {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# --- YAML ----------------------------------------------------------------------------------


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader composing at most MAX_DEPTH levels; `check_size(node)` bounds the expansion."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise FileProblem(f"nested more than {MAX_DEPTH} levels deep", mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def expanded_size(root: Node, limit: int) -> int:
    """Nodes of the document with every alias expanded, counted up to limit + 1.

    Memoized per node, so a document of N nodes costs O(N) whatever its aliases
    expand to; a node that contains itself (`&a [*a]`) is a FileProblem.
    """
    done: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            total = 1
            for child in _children(node):
                total = min(total + done[id(child)], limit + 1)
            done[key] = total
            on_path.discard(key)
            continue
        if key in done:
            continue
        if key in on_path:
            raise FileProblem("an alias refers to a collection that contains it", node.start_mark.line + 1)
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise FileProblem("an alias refers to a collection that contains it", child.start_mark.line + 1)
            if id(child) not in done:
                stack.append((child, False))
    return done[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_size(node: Node) -> None:
    """Refuse a composed document whose alias expansion is over the node limit."""
    limit = max_yaml_nodes()
    if expanded_size(node, limit) > limit:
        raise FileProblem(
            f"expands to more than {limit} YAML nodes (aliases are counted each time they are used; "
            f"set {MAX_YAML_NODES_ENV} to raise the limit)"
        )


def yaml_problem(exc: Exception, what: str = "YAML") -> FileProblem:
    """A PyYAML or construction error as one line, with its line number when known."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        return FileProblem(f"malformed {what}: {exc.problem or exc.context}{context}", mark.line + 1 if mark else None)
    if isinstance(exc, RecursionError):
        return FileProblem(f"malformed {what}: nested too deeply (more than {MAX_DEPTH} levels)")
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if isinstance(exc, ValueError):  # e.g. an integer of more than 4300 digits
        return FileProblem(f"malformed {what}: a value cannot be read: {first}")
    return FileProblem(f"malformed {what}: {first}")


def load_yaml_text(text: str, what: str = "YAML") -> object:
    """The data of one YAML document (safe types only), bounded in depth and expansion."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_size(node)
        return loader.construct_document(node)
    except FileProblem:
        raise
    except (yaml.YAMLError, RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise yaml_problem(exc, what) from None
    finally:
        loader.dispose()


# --- JSON ----------------------------------------------------------------------------------


def json_depth_ok(data: object) -> bool:
    """Is every collection in `data` at most MAX_DEPTH levels deep? (iterative)"""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return False
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
    return True


def load_json_text(text: str) -> object:
    """json.loads bounded in depth; NaN and Infinity come back as floats for the validators to refuse."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise FileProblem(f"not valid JSON: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise FileProblem(f"not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not json_depth_ok(data):
        raise FileProblem(f"not valid JSON: nested more than {MAX_DEPTH} levels deep")
    return data


def read_text(path: str | os.PathLike[str], *, what: str, limit: int, limit_env: str) -> str:
    """read_regular_file, then decode_text."""
    return decode_text(read_regular_file(path, what=what, limit=limit, limit_env=limit_env), what)
