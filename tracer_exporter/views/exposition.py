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

import gzip
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics_format

from tracer_exporter.model.counters import FIELDS, Counts, Row
from tracer_exporter.views.collector import TracerCollector, process_families

log = logging.getLogger(__name__)

_EOF = "# EOF\n"
# Level 1: 10,000 processes are 7.3 MB of text; level 1 makes it about 1 MB at a
# fraction of the cost of the default level 9 (README, "Scrape cost").
GZIP_LEVEL = 1


def gzip_accepted(header: str) -> bool:
    """Whether an Accept-Encoding value allows gzip (not when it says q=0)."""
    for item in header.split(","):
        coding, *params = (p.strip().lower() for p in item.split(";"))
        if coding in ("gzip", "x-gzip"):
            q = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


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


class ProcessText:
    """Writes the per-process families, remembering each process's lines from
    the last scrape: a process whose counters did not move costs one lookup.
    (Formatting nine numbers per process is what a scrape otherwise spends
    its time on, and between two scrapes most tracked processes are idle.)"""

    def __init__(self, headers: list[str]) -> None:
        self._headers = headers
        self._lines: dict[Row, tuple[str, ...]] = {}
        self._order = [Counts._fields.index(f.name) for f in FIELDS]
        self._names = [f"{f.metric}_total" for f in FIELDS]

    def _format(self, r: Row) -> tuple[str, ...]:
        parent = str(r.parent) if r.parent else ""
        lbl = f'{{comm="{_escape(r.comm)}",parent_pid="{parent}",pid="{r.pid}"}} '
        return tuple(f"{name}{lbl}{r.counts[i]}\n" for name, i in zip(self._names, self._order))

    def render(self, rows: list[Row], tracked: int | None = None) -> str:
        """rows: those with series; tracked: how many processes are tracked (default: len(rows))."""
        old, new = self._lines, {}
        for r in rows:
            lines = old.get(r)
            new[r] = lines if lines is not None else self._format(r)
        # Only the processes of this scrape are kept.
        self._lines = new
        per_row = list(new.values())
        parts = []
        for i, header in enumerate(self._headers[: len(FIELDS)]):
            parts.append(header)
            parts.append("".join([lines[i] for lines in per_row]))
        count = len(rows) if tracked is None else tracked
        parts.append(self._headers[len(FIELDS)] + f"tracer_tracked_processes {count}\n")
        return "".join(parts)


class MetricsApp:
    """The /metrics WSGI app: the process families fast, the registry for the rest."""

    def __init__(
        self,
        registry: CollectorRegistry,
        collector: TracerCollector,
        rows: Callable[[], list[Row]],
        with_series: Callable[[list[Row]], list[Row]] | None = None,
    ) -> None:
        self._registry = registry
        self._collector = collector
        self._rows = rows
        # Which rows get per-process series (a group's members only with per_process).
        self._with_series = with_series
        self._text = {False: ProcessText(_headers(False)), True: ProcessText(_headers(True))}
        self._lock = threading.Lock()  # a ProcessText keeps its templates between scrapes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        openmetrics = "application/openmetrics-text" in environ.get("HTTP_ACCEPT", "")
        started = time.perf_counter()
        text = ""
        try:
            rows = self._rows()
            shown = self._with_series(rows) if self._with_series else rows
            with self._lock:
                text = self._text[openmetrics].render(shown, len(rows))
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
        headers = [("Content-Type", content_type), ("Vary", "Accept-Encoding")]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", [*headers, ("Content-Length", str(len(body)))])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]
