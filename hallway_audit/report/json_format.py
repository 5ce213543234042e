"""JSON for tools: the schema in schema.py, sorted keys, stable across runs.

json.dumps with ensure_ascii escapes every control and non-ASCII character, so no
name from a checkpoint can break the document or a line of it."""

from __future__ import annotations

import json

from .base import Formatter, RenderOptions, register_formatter
from .rows import Doc


@register_formatter
class JsonFormatter(Formatter):
    name = "json"
    machine = True
    suffix = ".json"

    def render_document(self, doc: Doc, options: RenderOptions) -> str:
        return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=True) + "\n"
