"""What `tracer-exporter run` prints: the table, JSON or OpenMetrics of the command's processes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest

from tracer_exporter.model.counters import FIELDS, Counts, Row
from tracer_exporter.views.collector import process_families
from tracer_exporter.views.tables import tracer_table

FORMATS = ("table", "json", "openmetrics")


class _Rows:
    """A collector of fixed rows: what ran, after it ran."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def collect(self) -> Iterator[Metric]:
        return process_families(self.rows)


@dataclass(frozen=True)
class Result:
    rows: list[Row]
    status: int
    missing: int = 0  # processes whose rows were lost: the exited map was full


def total(rows: Sequence[Row]) -> Counts:
    return Counts(*(sum(getattr(r.counts, f) for r in rows) for f in Counts._fields))


def render(result: Result, fmt: str, follow: bool) -> str:
    rows = result.rows
    if fmt == "json":
        doc = {
            "exit_status": result.status,
            "processes": [
                {"pid": r.pid, "parent_pid": r.parent or None, "comm": r.comm, "counters": r.counts._asdict()}
                for r in rows
            ],
            "total": total(rows)._asdict(),
            "missing_processes": result.missing,
        }
        return json.dumps(doc, indent=1) + "\n"
    if fmt == "openmetrics":
        registry = CollectorRegistry()
        registry.register(_Rows(rows))
        return generate_latest(registry).decode()
    table = tracer_table(rows)
    if follow:
        t = total(rows)
        cells = ["total", *(str(getattr(t, f.name)) for f in FIELDS)]
        table += " ".join(cells) + "\n"
    return table


def missing_warning(missing: int) -> str:
    return (
        f"tracer-exporter run: {missing} processes are missing: they exited while the exited map"
        " (limits.max_tracked_processes) was full, so their rows are absent and total undercounts"
    )
