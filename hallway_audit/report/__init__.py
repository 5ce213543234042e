"""Reports: one formatter per output behind one base, registered by name."""

from . import json_format, junit, markdown, table  # noqa: F401  (registers the formatters)
from .base import FORMATTERS, Formatter, RenderOptions, formatter_names, get_formatter, register_formatter
from .schema import SCHEMA_VERSION, result_to_dict
from .write import write_atomic

__all__ = [
    "FORMATTERS",
    "SCHEMA_VERSION",
    "Formatter",
    "RenderOptions",
    "formatter_names",
    "get_formatter",
    "register_formatter",
    "result_to_dict",
    "write_atomic",
]
