"""Fitting a dialog's table to the terminal: the free-text column takes the width that is left, and its rows
wrap (auto height) instead of being cut at the edge (80×24, 120×40)."""

from __future__ import annotations

from collections.abc import Sequence

WIDE_DIALOG_COLUMNS = 140  # .wide-dialog's width in app.tcss
DIALOG_SHARE = 0.96  # .dialog's max-width
DIALOG_CHROME = 2 + 4 + 2  # border, padding, and a vertical scrollbar if the rows overflow
CELL_PADDING = 2  # DataTable's cell padding, one column either side


def rest_width(terminal_columns: int, fixed: Sequence[int], *, minimum: int = 16) -> int:
    """The width of the one flexible column next to `fixed` ones, in a wide dialog on this terminal."""
    dialog = min(WIDE_DIALOG_COLUMNS, int(terminal_columns * DIALOG_SHARE))
    free = dialog - DIALOG_CHROME - sum(fixed) - CELL_PADDING * (len(fixed) + 1)
    return max(minimum, free)


def table_rows_that_fit(terminal_lines: int, chrome_lines: int, *, most: int = 20, least: int = 4) -> int:
    """A dialog table's max height on this terminal: what the dialog's other lines leave (on 24 lines the
    fixed 20 pushed the table's last rows and the dialog's own key line out of sight)."""
    return max(least, min(most, terminal_lines - chrome_lines))
