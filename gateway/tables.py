"""Tables for the command line that fit the terminal without cutting a value.

A table wider than the terminal made rich wrap cells, cut them (``1234567…``) and, past a point, drop
whole columns: a batch total cut short is worse than no table. Here a table is one line per row when
every row fits the width, and otherwise one block per row: the row's leading cells as its title line,
then ``name value`` pairs, as many on a line as fit, so every value is printed whole at any width
(a pair longer than the width gets a line of its own). Output that is not a terminal (a pipe, a
file) has no width: one line per row, for grep and awk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Column", "render_table"]

_GAP = "  "
_INDENT = "    "


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    #: numbers line up on the right in the one-line form
    right: bool = False


def render_table(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], *, width: int | None, heading: int = 1
) -> list[str]:
    """The lines of the table: one per row if they fit in ``width`` (None: no limit), else a block
    per row whose first line holds the first ``heading`` cells."""
    sizes = [max(len(column.name), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    if width is None or sum(sizes) + len(_GAP) * (len(columns) - 1) <= width:
        return _lines(title, columns, rows, sizes)
    return _blocks(title, columns, rows, width, heading)


def _lines(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], sizes: list[int]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(size) if column.right else cell.ljust(size)
            for column, cell, size in zip(columns, cells, sizes, strict=True)
        )
        return _GAP.join(padded).rstrip()

    header = line([column.name for column in columns])
    return [title, header, "-" * len(header), *(line(row) for row in rows)]


def _blocks(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int, heading: int
) -> list[str]:
    out = [title]
    for row in rows:
        out.append("")
        out.extend(_wrap(row[:heading], width, ""))
        pairs = [f"{column.name} {cell}" for column, cell in zip(columns[heading:], row[heading:], strict=True)]
        out.extend(_wrap(pairs, width, _INDENT))
    return out


def _wrap(parts: Sequence[str], width: int, indent: str) -> list[str]:
    """``parts`` joined by gaps, a new line where the next part would not fit in ``width``. A part is
    never broken: one longer than the width gets a line of its own and overflows it, whole."""
    lines: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current}{_GAP}{part}" if current else part
        if current and len(indent) + len(candidate) > width:
            lines.append(indent + current)
            candidate = part
        current = candidate
    if current:
        lines.append(indent + current)
    return lines
