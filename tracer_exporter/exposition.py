"""/metrics, with the per-process families written directly.

prometheus_client builds an object and formats a label set for every
sample: with 10,000 tracked processes and nine counters each, that alone
takes seconds in the test guests. Here each process's label set is escaped
once and its nine lines are joined as text; the HELP/TYPE/UNIT headers come
from prometheus_client itself (formatted once), and every other family still
goes through the registry, so the output is what prometheus_client would
write, in either format.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics_format

from tracer_exporter.collector import TracerCollector, process_families
from tracer_exporter.counters import FIELDS, Counts, Row

log = logging.getLogger(__name__)

_EOF = "# EOF\n"


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class _Families:
    """A registry holding given metric families, to format their headers."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterable[Any]:
        return self._families


def _headers(openmetrics: bool) -> list[str]:
    """HELP/TYPE(/UNIT) lines of each per-process family, then of the count gauge."""
    generate = openmetrics_format.generate_latest if openmetrics else text_format.generate_latest
    out = []
    for family in process_families([]):
        text = generate(_Families([family])).decode()  # type: ignore[arg-type]
        # Comment lines only: the count gauge of no rows carries a sample.
        out.append("".join(line for line in text.splitlines(keepends=True) if line.startswith("# ") and line != _EOF))
    return out


def render_processes(rows: list[Row], openmetrics: bool, headers: list[str]) -> str:
    labels = []
    for r in rows:
        parent = str(r.parent) if r.parent else ""
        labels.append(f'{{comm="{_escape(r.comm)}",parent_pid="{parent}",pid="{r.pid}"}} ')
    parts = []
    for f, header in zip(FIELDS, headers):
        name = f"{f.metric}_total"
        i = Counts._fields.index(f.name)
        parts.append(header)
        parts.append("".join([f"{name}{lbl}{r.counts[i]}\n" for r, lbl in zip(rows, labels)]))
    gauge = headers[len(FIELDS)]
    parts.append(gauge + f"tracer_tracked_processes {len(rows)}\n")
    return "".join(parts)


class MetricsApp:
    """The /metrics WSGI app: the process families fast, the registry for the rest."""

    def __init__(self, registry: CollectorRegistry, collector: TracerCollector, rows: Callable[[], list[Row]]) -> None:
        self._registry = registry
        self._collector = collector
        self._rows = rows
        self._headers = {False: _headers(False), True: _headers(True)}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        openmetrics = "application/openmetrics-text" in environ.get("HTTP_ACCEPT", "")
        started = time.perf_counter()
        text = ""
        try:
            text = render_processes(self._rows(), openmetrics, self._headers[openmetrics])
        except Exception:
            # As the collector does: logged and counted, and the rest is served.
            log.exception("reading the tracked processes failed")
            self._collector.count_error("processes")
        self._collector.extra_seconds = time.perf_counter() - started
        if openmetrics:
            body = text.encode() + openmetrics_format.generate_latest(self._registry)
            content_type = openmetrics_format.CONTENT_TYPE_LATEST
        else:
            body = text.encode() + text_format.generate_latest(self._registry)
            content_type = text_format.CONTENT_TYPE_LATEST
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]
