"""The format registry: name -> Format instance, plus aliases.

Adding a format is one `register(...)` line in catalog.py; nothing else in the
code base enumerates formats.
"""

from __future__ import annotations

from typing import TypeVar

from hallway_audit.errors import UnknownNameError
from hallway_audit.lattice.base import Format

F = TypeVar("F", bound=Format)  # register() returns what it was given, subtype kept
_REGISTRY: dict[str, Format] = {}  # insertion order is list_formats() order
_ALIASES: dict[str, str] = {}  # lower-case alias -> canonical name


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register(fmt: F, *aliases: str) -> F:
    """Add `fmt` (and lower-case aliases for it) to the registry; returns fmt."""
    key = _key(fmt.name)
    if key in _REGISTRY or key in _ALIASES:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _REGISTRY[key] = fmt
    for alias in aliases:
        _ALIASES[_key(alias)] = key
    return fmt


def get_format(name: str) -> Format:
    """The format called `name` (case-insensitive, aliases such as 'e4m3', 'float32')."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnknownNameError("format", name, list_formats()) from None


def list_formats() -> list[str]:
    """Canonical names of all registered formats, in registration order."""
    return [fmt.name for fmt in _REGISTRY.values()]
