"""Reports: one formatter per output behind one base, registered by name.

Formatters render the JSON document (`as_document(result)`, or a saved report read
by `load_report`); `outputs` checks and writes several outputs of one run.
"""

from . import json_format, junit, markdown, table  # noqa: F401  (registers the formatters)
from .base import FORMATTERS, Formatter, RenderOptions, formatter_names, get_formatter, register_formatter
from .document import as_document, load_report
from .schema import SCHEMA_VERSION, result_to_dict
from .write import write_atomic

__all__ = [
    "FORMATTERS",
    "SCHEMA_VERSION",
    "Formatter",
    "RenderOptions",
    "as_document",
    "formatter_names",
    "get_formatter",
    "load_report",
    "register_formatter",
    "result_to_dict",
    "write_atomic",
]
