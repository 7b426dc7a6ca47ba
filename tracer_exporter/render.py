"""Text and JSON views of the tracked processes."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tracer_exporter.counters import FIELDS, Row

HEADER = ("PID", *(f.column for f in FIELDS))


def tracer_table(rows: Sequence[Row]) -> str:
    """The /proc/tracer table: a header, then a row of integers per process."""
    table = [HEADER, *((str(r.pid), *(str(getattr(r.counts, f.name)) for f in FIELDS)) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    return "".join(" ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() + "\n" for line in table)


def pids_json(rows: Sequence[Row]) -> bytes:
    doc = [{"pid": r.pid, "comm": r.comm, "counters": r.counts._asdict()} for r in rows]
    return json.dumps(doc, indent=1).encode() + b"\n"
