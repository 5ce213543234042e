"""Output formats behind one base: adding one is a class and a registry entry.

Every formatter renders the JSON document (schema.py), never the in-memory
result: `render(result)` converts first, exactly as a saved report would read
back, so `hallway-audit render audit.json` prints what the audit printed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UnknownNameError

if TYPE_CHECKING:
    from ..audit import AuditResult


@dataclass(frozen=True)
class RenderOptions:
    color: bool = False
    width: int = 120
    max_rows: int = 40  # per-layer rows shown by human formats; 0 = all


class Formatter(ABC):
    name: ClassVar[str]
    machine: ClassVar[bool]  # machine formats keep stdout to the document alone
    suffix: ClassVar[str]

    def render(self, report: AuditResult | Mapping[str, Any], options: RenderOptions) -> str:
        """Render an AuditResult or its JSON document (`result.to_dict()`, or a saved report)."""
        from .document import as_document

        return self.render_document(as_document(report), options)

    @abstractmethod
    def render_document(self, doc: Mapping[str, Any], options: RenderOptions) -> str: ...

    def render_stream(self, doc: Mapping[str, Any], options: RenderOptions, write: Callable[[str], Any]) -> None:
        """Hand render_document's text to `write`, in pieces if the format can (a
        report of 10^6 outcomes then goes to its file without being one string)."""
        write(self.render_document(doc, options))


FORMATTERS: dict[str, type[Formatter]] = {}


def register_formatter(cls: type[Formatter]) -> type[Formatter]:
    FORMATTERS[cls.name] = cls
    return cls


def get_formatter(name: str) -> Formatter:
    try:
        return FORMATTERS[name]()
    except KeyError:
        raise UnknownNameError("output format", name, sorted(FORMATTERS)) from None


def formatter_names() -> list[str]:
    return list(FORMATTERS)
