"""Numbers as people read them: durations and aligned tables, for mpdctl's output."""

from __future__ import annotations

from collections.abc import Sequence


def duration(seconds: float) -> str:
    """0.4 -> '400ms', 75 -> '1m15s', 93784 -> '1d2h'; two units at most."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    whole = int(seconds)
    for size, unit, smaller, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"),
                                            (60, "m", 1, "s")):
        if whole >= size:
            rest = (whole % size) // smaller
            return f"{whole // size}{unit}{rest}{small_unit}" if rest else f"{whole // size}{unit}"
    return f"{whole}s"  # not reached: whole >= 60 here


def table(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(heads)]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [list(heads), *rows]]
