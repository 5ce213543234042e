"""Output formats behind one base: adding one is a class and a registry entry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

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

    @abstractmethod
    def render(self, result: AuditResult, options: RenderOptions) -> str: ...


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
