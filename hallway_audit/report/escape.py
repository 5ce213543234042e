"""Strings from a checkpoint, plan or rule file are data, never layout.

Tensor names, rule ids, messages and setting ids reach every report. A name holding
a newline, a carriage return or an ESC sequence must not forge report lines or
drive the terminal; rich markup (`[/]`, `[bold]`) must not crash or restyle the
table; Markdown syntax must not forge headers, tables or links; XML must stay
well-formed. Each output format calls one function here on every such string.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters that reorder or hide text without being control characters (bidi
# overrides and isolates, "trojan source"), and the two XML 1.0 non-characters.
_INVISIBLE = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufffe\uffff")


def _needs_escape(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _INVISIBLE


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: object) -> str:
    """One line of printable text: control, line-breaking, bidi and surrogate characters
    become visible escapes (`\\x1b`, `\\r`, `\\n`, `\\u202e`); everything else is kept."""
    s = str(text)
    if not any(_needs_escape(ch) for ch in s):
        return s
    return "".join(_escape_char(ch) if _needs_escape(ch) else ch for ch in s)


_MD_BACKSLASHED = frozenset("\\`*_[]#|~!{}")
_MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def md_text(text: object) -> str:
    """Markdown text that renders as written: one line, no emphasis, link, header,
    HTML or table cell boundary can be formed from it."""
    out = []
    for ch in visible(text):
        if ch in _MD_BACKSLASHED:
            out.append("\\" + ch)
        else:
            out.append(_MD_ENTITIES.get(ch, ch))
    return "".join(out)


def md_code(text: object, *, in_table: bool = True) -> str:
    """A Markdown code span holding `text` literally: the fence is one backtick longer
    than the longest run inside (CommonMark), and in a table `|` is escaped, which
    GitHub's table parser removes again before the span is read."""
    s = visible(text)
    longest = run = 0
    for ch in s:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    if in_table:
        s = s.replace("|", "\\|")
    pad = " " if s.startswith("`") or s.endswith("`") or (s.startswith(" ") and s.endswith(" ") and s.strip()) else ""
    return f"{fence}{pad}{s}{pad}{fence}" if s else "` `"
