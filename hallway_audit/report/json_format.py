"""JSON for tools: the schema in schema.py, sorted keys, stable across runs.

Strings are written by json's ASCII encoder (indented_json.py writes what
json.dumps(indent=2) would), which escapes every control and non-ASCII character,
so no name from a checkpoint can break the document or a line of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Formatter, RenderOptions, register_formatter
from .indented_json import dumps_indented, write_indented
from .rows import Doc


@register_formatter
class JsonFormatter(Formatter):
    name = "json"
    machine = True
    suffix = ".json"

    def render_document(self, doc: Doc, options: RenderOptions) -> str:
        return dumps_indented(doc) + "\n"  # json.dumps(doc, indent=2, sort_keys=True, allow_nan=False)

    def render_stream(self, doc: Doc, options: RenderOptions, write: Callable[[str], Any]) -> None:
        write_indented(doc, write)
        write("\n")
