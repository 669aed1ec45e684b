"""Command-line tables fit the width they are given and never cut a value (issue 22)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.tables import Column, render_table

COLUMNS = [Column("merchant"), Column("terminal"), Column("batch"), Column("state"), Column("debits", right=True)]
ROW = ["MERCHANT0000001", "TERM0001", "000001", "closed (mismatch)", "12 / 123456789012"]

cell = st.text(alphabet="ABCDEFGHIJ0123456789 /()-", min_size=1, max_size=24).map(str.strip).filter(bool)
rows = st.lists(st.lists(cell, min_size=len(COLUMNS), max_size=len(COLUMNS)), min_size=1, max_size=5)


def test_rows_that_fit_are_one_line_each_with_numbers_on_the_right() -> None:
    lines = render_table("Batches", COLUMNS, [ROW], width=120)
    assert lines[0] == "Batches"
    assert lines[1].split() == ["merchant", "terminal", "batch", "state", "debits"]
    assert lines[3] == "MERCHANT0000001  TERM0001  000001  closed (mismatch)  12 / 123456789012"


def test_without_a_width_every_row_is_one_line_however_long() -> None:
    long_row = [*ROW[:4], "9" * 300]
    lines = render_table("Batches", COLUMNS, [long_row], width=None)
    assert lines[3].endswith("9" * 300)
    assert len(lines) == 4


def test_rows_that_do_not_fit_become_blocks_of_name_and_value() -> None:
    lines = render_table("Batches", COLUMNS, [ROW], width=42, heading=2)
    assert lines == [
        "Batches",
        "",
        "MERCHANT0000001  TERM0001",
        "    batch 000001  state closed (mismatch)",
        "    debits 12 / 123456789012",
    ]


@given(rows, st.integers(min_value=20, max_value=200))
def test_every_value_is_printed_whole_and_no_line_is_wider_than_the_width(table: list[list[str]], width: int) -> None:
    lines = render_table("Title", COLUMNS, table, width=width, heading=2)
    text = "\n".join(lines)
    for row in table:
        for value in row:
            assert any(value in line for line in lines), value  # on one line, not broken across two
    assert "…" not in text
    pairs = [f"{column.name} {value}" for row in table for column, value in zip(COLUMNS, row, strict=True)]
    longest_pair = max(len(pair) for pair in pairs)
    for line in lines:
        assert len(line) <= max(width, len("    ") + longest_pair), line
