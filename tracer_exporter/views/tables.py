"""Text and JSON views of the tracked processes."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tracer_exporter.model.counters import FIELDS, Counts, Row

HEADER = ("PID", *(f.column for f in FIELDS))
_ORDER = [Counts._fields.index(f.name) for f in FIELDS]  # /tracer columns as indexes of Counts


class TracerTable:
    """The /proc/tracer table: a header, then a row of integers per process.

    Keeps each process's line from the last call: a process whose counters
    did not move (most, between two reads) costs a lookup, not ten numbers
    to format.
    """

    def __init__(self) -> None:
        self._widths: list[int] = []
        self._lines: dict[tuple[int, Counts], str] = {}

    def render(self, rows: Sequence[Row]) -> str:
        widths = [len(h) for h in HEADER]
        if rows:
            # Counters are not negative: a column's widest number is its largest.
            columns = list(zip(*[r.counts for r in rows]))
            widths[0] = max(widths[0], len(str(max([r.pid for r in rows]))))
            for col, i in enumerate(_ORDER, start=1):
                widths[col] = max(widths[col], len(str(max(columns[i]))))
        if widths != self._widths:
            self._widths, self._lines = widths, {}
        # The last column unpadded, so that no line ends in spaces.
        line = " ".join(f"%-{w}d" for w in widths[:-1]) + " %d\n"
        old, new = self._lines, {}
        for r in rows:
            key = (r.pid, r.counts)
            text = old.get(key)
            new[key] = text if text is not None else line % (r.pid, *[r.counts[i] for i in _ORDER])
        self._lines = new
        head = " ".join(f"{h:<{w}}" for h, w in zip(HEADER[:-1], widths)) + " " + HEADER[-1] + "\n"
        return head + "".join(new.values())


def tracer_table(rows: Sequence[Row]) -> str:
    """The table, formatted afresh."""
    return TracerTable().render(rows)


def group_table(rows: Sequence[Row]) -> str:
    """The table with a GROUP column first, sorted by group ("-": in none), then pid."""
    rows = sorted(rows, key=lambda r: (r.group == "", r.group, r.pid))
    cells = [("GROUP", *HEADER)] + [(r.group or "-", str(r.pid), *(str(r.counts[i]) for i in _ORDER)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "".join(" ".join(f"{v:<{w}}" for v, w in zip(c[:-1], widths)) + " " + c[-1] + "\n" for c in cells)


def pids_json(rows: Sequence[Row]) -> bytes:
    doc = [{"pid": r.pid, "comm": r.comm, "group": r.group or None, "counters": r.counts._asdict()} for r in rows]
    return json.dumps(doc, indent=1).encode() + b"\n"
