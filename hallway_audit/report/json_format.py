"""JSON for tools: the schema in schema.py, sorted keys, stable across runs."""

from __future__ import annotations

import json

from .base import Formatter, RenderOptions, register_formatter


@register_formatter
class JsonFormatter(Formatter):
    name = "json"
    machine = True
    suffix = ".json"

    def render(self, result, options: RenderOptions) -> str:
        return json.dumps(result.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
