"""Text and JSON views of the tracked processes."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tracer_exporter.counters import FIELDS, Counts, Row

HEADER = ("PID", *(f.column for f in FIELDS))
FIELD_INDEX = {name: i for i, name in enumerate(Counts._fields)}


def tracer_table(rows: Sequence[Row]) -> str:
    """The /proc/tracer table: a header, then a row of integers per process."""
    order = [FIELD_INDEX[f.name] for f in FIELDS]
    cells = [(r.pid, *[r.counts[i] for i in order]) for r in rows]
    widths = [len(h) for h in HEADER]
    if cells:
        # Counters are not negative: a column's widest number is its largest.
        widths = [max(w, len(str(max(col)))) for w, col in zip(widths, zip(*cells))]
    line = " ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*HEADER).rstrip()]
    out += [line.format(*c).rstrip() for c in cells]
    return "\n".join(out) + "\n"


def pids_json(rows: Sequence[Row]) -> bytes:
    doc = [{"pid": r.pid, "comm": r.comm, "counters": r.counts._asdict()} for r in rows]
    return json.dumps(doc, indent=1).encode() + b"\n"
