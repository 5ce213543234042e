"""Indented JSON, byte for byte as `json.dumps(value, indent=2, sort_keys=True,
allow_nan=False)` writes it, in a fraction of the time and, streamed, of the memory.

The standard library encodes in C only without `indent`; with it, every value goes
through a Python generator, and the whole text is built before it can be written.
The JSON report of a checkpoint with 10^5 layers holds 10^6 rule outcomes (400 MB
of text). Here Python walks only the containers that hold other non-empty
containers; every container holding only scalars (an outcome, a format summary:
nearly all of them) is encoded by the C encoder with the item separator of its
depth, which is the indented text once its brackets get their line breaks. Keys,
strings and numbers are therefore written by the same code as json.dumps's
(`tests/test_report_json.py` checks the equality on generated values). The text
goes to `write` in pieces of about CHUNK characters, so a report streams to its
file without ever being one string.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from json import encoder as _encoder
from typing import Any

INDENT = 2
CHUNK = 1 << 20  # characters handed to `write` at a time
BATCH = 1000  # list items of scalars encoded by one C call
_CONTAINERS = (dict, list, tuple)
_SCALARS = frozenset({str, int, float, bool, type(None)})
_C_ENCODER = getattr(_encoder, "c_make_encoder", None)
_QUOTE = _encoder.encode_basestring_ascii


def _default(value: Any) -> Any:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


def _key(key: Any) -> str:
    """A key as json's encoder writes it, quoted."""
    if isinstance(key, str):
        return _QUOTE(key)
    if isinstance(key, float):
        return _QUOTE(json.dumps(key, allow_nan=False))
    if key is True or key is False or key is None:
        return _QUOTE(json.dumps(key))
    if isinstance(key, int):
        return _QUOTE(int.__repr__(key))
    raise TypeError(f"keys must be str, int, float, bool or None, not {key.__class__.__name__}")


def _holds_containers(values: Iterable[Any]) -> bool:
    """Does any value need lines of its own (a non-empty dict, list or tuple)?"""
    return any(type(v) not in _SCALARS and isinstance(v, _CONTAINERS) and v for v in values)


class _Writer:
    def __init__(self, write: Callable[[str], Any]) -> None:
        self.sink = write
        self.parts: list[str] = []
        self.size = 0
        self.encoders: list[Any] = []  # per depth: a C encoder whose item separator breaks the line there
        self.active: set[int] = set()  # ids of the containers being written: a cycle is an error, as in json

    def emit(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.sink("".join(self.parts))
            self.parts = []
            self.size = 0

    def encoder(self, depth: int) -> Any:
        while len(self.encoders) <= depth:
            newline = "\n" + " " * (INDENT * len(self.encoders))
            self.encoders.append(_C_ENCODER(  # type: ignore[misc]
                None, _default, _QUOTE, None, ": ", "," + newline, True, False, False,
            ))
        return self.encoders[depth]

    def value(self, prefix: str, value: Any, depth: int) -> None:
        """Emit `prefix` and `value`, whose first line is already indented to `depth`."""
        if type(value) not in _SCALARS:
            if isinstance(value, dict):
                if value and _holds_containers(value.values()):
                    self.emit(prefix)
                    self.nested_dict(value, depth)
                    return
            elif isinstance(value, (list, tuple)):
                if value and _holds_containers(value):
                    self.emit(prefix)
                    self.nested_list(value, depth)
                    return
            else:  # str/int/float subclasses; anything else raises json's TypeError
                self.emit(prefix + "".join(self.encoder(0)(value, 0)))
                return
            if value:
                self.emit(prefix + self.flat(value, depth))
                return
        self.emit(prefix + "".join(self.encoder(0)(value, 0)))  # a scalar, {} or []

    def flat(self, value: Any, depth: int) -> str:
        """A non-empty container of scalars: the C encoder's text, its brackets on their own lines."""
        text = "".join(self.encoder(depth + 1)(value, 0))
        return f"{text[0]}\n{' ' * (INDENT * (depth + 1))}{text[1:-1]}\n{' ' * (INDENT * depth)}{text[-1]}"

    def enter(self, value: Any) -> None:
        if id(value) in self.active:
            raise ValueError("Circular reference detected")
        self.active.add(id(value))

    def nested_dict(self, value: dict[Any, Any], depth: int) -> None:
        self.enter(value)
        inner = "\n" + " " * (INDENT * (depth + 1))
        prefix = "{" + inner
        for key, item in sorted(value.items()):
            self.value(f"{prefix}{_key(key)}: ", item, depth + 1)
            prefix = "," + inner
        self.emit(f"\n{' ' * (INDENT * depth)}}}")
        self.active.discard(id(value))

    def nested_list(self, value: list[Any] | tuple[Any, ...], depth: int) -> None:
        self.enter(value)
        inner = "\n" + " " * (INDENT * (depth + 1))
        prefix = "[" + inner
        run: list[dict[Any, Any]] = []
        for item in value:
            if type(item) is dict and item and _SCALARS.issuperset(map(type, item.values())):
                run.append(item)
                if len(run) == BATCH:
                    prefix = self.records(prefix, run, depth + 1)
                continue
            if run:
                prefix = self.records(prefix, run, depth + 1)
            self.value(prefix, item, depth + 1)
            prefix = "," + inner
        if run:
            self.records(prefix, run, depth + 1)
        self.emit(f"\n{' ' * (INDENT * depth)}]")
        self.active.discard(id(value))

    def records(self, prefix: str, run: list[dict[Any, Any]], depth: int) -> str:
        """Emit list items that are dicts of scalars (outcomes, findings) with one C call:
        the encoder of their entries' depth also separates the items, so each item
        boundary '},<entry indent>{' (which nothing inside a dict of scalars can
        contain: strings hold no raw line break) gets the items' indent. Empties `run`;
        returns the next item's prefix."""
        outer = "\n" + " " * (INDENT * depth)
        entries = "\n" + " " * (INDENT * (depth + 1))
        text = "".join(self.encoder(depth + 1)(run, 0))[2:-2]  # without '[{' and '}]'
        text = text.replace("}," + entries + "{", outer + "}," + outer + "{" + entries)
        self.emit(f"{prefix}{{{entries}{text}{outer}}}")
        run.clear()
        return "," + outer


def write_indented(value: Any, write: Callable[[str], Any]) -> None:
    """Hand json.dumps(value, indent=2, sort_keys=True, allow_nan=False) to `write`, in pieces."""
    if _C_ENCODER is None:  # a Python without the _json accelerator
        for piece in json.JSONEncoder(indent=INDENT, sort_keys=True, allow_nan=False).iterencode(value):
            write(piece)
        return
    writer = _Writer(write)
    writer.value("", value, 0)
    writer.flush()


def dumps_indented(value: Any) -> str:
    """json.dumps(value, indent=2, sort_keys=True, allow_nan=False), the same text."""
    parts: list[str] = []
    write_indented(value, parts.append)
    return "".join(parts)
