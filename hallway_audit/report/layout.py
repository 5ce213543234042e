"""Tables that fit the width they are given, without losing the verdict.

rich shrinks a table that is too wide by squeezing every column, which truncated
verdicts and broke layer names mid-word. Here each column's width is decided
before rich sees it: layer names are abbreviated predictably (the head and the
tail of the dotted path kept, `…` in the middle), columns that wrap (verdicts,
messages) wrap only between words, and when the numbers alone do not fit, whole
columns are dropped in a fixed order (and named in the caption) — never the
layer, the message or the verdict.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich import box
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

ELLIPSIS = "…"
DEFAULT_WIDTH = 120
MIN_WIDTH, MAX_WIDTH = 40, 1000
NAME_MIN = 16  # narrowest layer-name column before optional columns are dropped
WORD_CAP = 24  # a wrapping column need not be wider than this for one long word (it folds)


def report_width(to_stdout: bool, environ: dict[str, str] | None = None) -> int:
    """Columns for a table: $COLUMNS when set; for stdout, else the size of the
    terminal the user sees (stdout, else stderr or stdin when stdout is a pipe);
    else DEFAULT_WIDTH. Files get $COLUMNS or DEFAULT_WIDTH, whatever the terminal."""
    env = os.environ if environ is None else environ
    try:
        columns = int(env.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and to_stdout:
        for stream in (sys.stdout, sys.stderr, sys.stdin):
            try:
                columns = os.get_terminal_size(stream.fileno()).columns
            except (AttributeError, OSError, ValueError):
                continue
            if columns > 0:
                break
    if columns <= 0:
        columns = DEFAULT_WIDTH
    return max(MIN_WIDTH, min(MAX_WIDTH, columns))


def _head(text: str, width: int) -> str:
    """The longest prefix of `text` at most `width` cells wide."""
    out, used = [], 0
    for ch in text:
        w = cell_len(ch)
        if used + w > width:
            break
        out.append(ch)
        used += w
    return "".join(out)


def _tail(text: str, width: int) -> str:
    return _head(text[::-1], width)[::-1]


def abbreviate(name: str, width: int) -> str:
    """Fit a dotted module path into `width` cells: the head and the tail kept, `…` between.

    Candidates: leading components (none or more), or the block index with the
    component before it after a leading `…` (`…layers.3`); then `…`; then whole
    trailing components (at least the last one) or, after a non-empty head, the
    name's last characters. The one chosen keeps the first block index (the first
    all-digit component) if any candidate does, then whole components, then the
    first component, then the fewest `…`, then the most characters:
    `model.layers.3.self_attn.q_proj` is `model.layers.3…q_proj` at 21 columns,
    `…3.self_attn.q_proj` at 19 and `…layers.3…q_proj` at 16. A name with no
    candidate keeps its first third and last two thirds of characters.
    """
    if cell_len(name) <= width:
        return name
    if width <= 1:
        return ELLIPSIS[:width]
    parts = name.split(".")
    n = len(parts)
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    heads: list[tuple[str, list[int]]] = [(".".join(parts[:h]), list(range(h))) for h in range(n)]
    if numeric and numeric[0] > 0:
        f = numeric[0]
        heads += [(ELLIPSIS + ".".join(parts[j:f + 1]), list(range(j, f + 1))) for j in (f - 1, f) if j >= 1]
    best: tuple[tuple[int, ...], str] | None = None
    for head, kept in heads:
        end = max(kept, default=-1)  # last component the head shows
        candidates = [(head + ELLIPSIS + ".".join(parts[n - t:]), kept + list(range(n - t, n)), True)
                      for t in range(1, n - end)]
        if head:
            room = min(width - cell_len(head) - 1, len(name) - len(".".join(parts[:end + 1])) - 1)
            if room >= 4:
                candidates.append((head + ELLIPSIS + _tail(name, room), kept, False))
        for text, shown, whole in candidates:
            if cell_len(text) > width:
                continue
            score = (int(bool(numeric) and numeric[0] in shown), int(whole), int(0 in shown),
                     -text.count(ELLIPSIS), cell_len(text))
            if best is None or score > best[0]:
                best = (score, text)
    if best is not None:
        return best[1]
    budget = width - 1
    front = _head(name, budget // 3)
    return front + ELLIPSIS + _tail(name, budget - cell_len(front))


@dataclass
class Column:
    """One column and its cells. `drop`: 0 never dropped, else dropped in increasing
    order when the table does not fit. `kind`: 'fixed' (no wrap), 'wrap' (wraps
    between words, at least its longest word wide), 'name' (abbreviated to fit)."""

    header: str
    cells: list[Text] = field(default_factory=list)
    justify: str = "right"
    kind: str = "fixed"
    drop: int = 0
    label: str = ""  # how the caption names it when dropped (default: the header)
    floor: int = 0  # narrowest width a name / wrap column takes
    comfort: int = 0  # a wrap column's width before names get spare room (e.g. its longest item)

    def natural(self) -> int:
        lines = [cell_len(line) for line in self.header.split("\n")]
        for cell in self.cells:
            lines.extend(cell_len(line) for line in cell.plain.split("\n"))
        return max(lines, default=1)

    def minimum(self) -> int:
        if self.kind == "fixed":
            return self.natural()
        header = max(cell_len(w) for w in self.header.replace("\n", " ").split(" "))
        if self.kind == "name":
            return max(header, min(self.natural(), self.floor or NAME_MIN))
        longest = max((cell_len(w) for cell in self.cells for w in cell.plain.split()), default=0)
        return max(header, min(self.natural(), self.floor), min(longest, WORD_CAP))


def _total(columns: Sequence[Column], widths: Sequence[int]) -> int:
    return sum(widths) + 3 * len(columns) + 1  # box.SIMPLE_HEAD with padding (0, 1)


def fit(columns: list[Column], width: int) -> tuple[list[Column], list[int], list[str]]:
    """The columns kept, their widths, and the labels of those dropped."""
    kept = list(columns)
    dropped: list[str] = []
    while True:
        mins = [c.minimum() for c in kept]
        if _total(kept, mins) <= width or not any(c.drop for c in kept):
            break
        victim = min((c for c in kept if c.drop), key=lambda c: c.drop)
        kept.remove(victim)
        dropped.append(victim.label or victim.header.replace("\n", " "))
    widths = [c.natural() if c.kind == "fixed" else c.minimum() for c in kept]
    spare = width - _total(kept, widths)
    # Spare room goes to wrapping columns up to their comfort width, then to names (less
    # abbreviation), then to wrapping columns up to their natural width.
    for kind, target in (("wrap", "comfort"), ("name", "natural"), ("wrap", "natural")):
        for i, c in enumerate(kept):
            if c.kind == kind and spare > 0:
                goal = min(c.natural(), c.comfort) if target == "comfort" else c.natural()
                extra = min(spare, goal - widths[i])
                if extra > 0:
                    widths[i] += extra
                    spare -= extra
    return kept, widths, dropped


def fitted_table(title: str | Text, columns: list[Column], width: int, caption: list[str] | None = None) -> Table:
    """A rich table whose every column width is decided here (see the module docstring)."""
    kept, widths, dropped = fit(columns, width)
    t = Table(
        title=title if isinstance(title, Text) else Text(title),
        box=box.SIMPLE_HEAD,
        title_justify="left",
        caption_justify="left",
        padding=(0, 1),
    )
    for c, w in zip(kept, widths, strict=True):
        t.add_column(Text(c.header), justify=c.justify, width=w, no_wrap=c.kind != "wrap", overflow="fold")  # type: ignore[arg-type]
    n_rows = max((len(c.cells) for c in columns), default=0)
    for i in range(n_rows):
        row = []
        for c, w in zip(kept, widths, strict=True):
            cell = c.cells[i]
            if c.kind == "name" and cell_len(cell.plain) > w:
                cell = Text(abbreviate(cell.plain, w), style=cell.style)
            row.append(cell)
        t.add_row(*row)
    notes = list(caption or [])
    if dropped:
        notes.append(f"not shown at {width} columns: {', '.join(dropped)} (set COLUMNS wider, or --format json)")
    if notes:
        t.caption = Text("\n".join(notes))
    return t
