"""The fast /metrics writes what prometheus_client would, in both formats."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics_format
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tracer_exporter.model.counters import Counts, Row
from tracer_exporter.model.health import Health
from tracer_exporter.views.collector import TracerCollector
from tracer_exporter.views.exposition import MetricsApp

ROWS = [
    Row(7, "sh", Counts(1, 2, 3, 4, 5, 6, 7, 8, 9)),
    Row(42, 'we"ird\\na\nme', Counts(10**12, 0, 0, 0, 0, 0, 0, 0, 3), parent=7),
]


def scrape(app, accept: str = "") -> tuple[str, str]:
    got = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app({"REQUEST_METHOD": "GET", "HTTP_ACCEPT": accept}, start_response))
    assert got["status"] == "200 OK"
    return got["headers"]["Content-Type"], body.decode()


def samples(families) -> list[tuple[str, str, tuple, float]]:
    out = []
    for f in families:
        for s in f.samples:
            if s.name != "tracer_scrape_duration_seconds":
                out.append((f.name, f.type, tuple(sorted(s.labels.items())), s.value))
    return sorted(out)


def registries():
    slow = CollectorRegistry()
    slow.register(TracerCollector(lambda: ROWS, lambda: Health(alloc_entries=3), "1", "k"))
    fast = CollectorRegistry()
    collector = TracerCollector(lambda: ROWS, lambda: Health(alloc_entries=3), "1", "k", processes=False)
    fast.register(collector)
    return slow, MetricsApp(fast, collector, lambda: ROWS)


def test_text_format_matches_prometheus_client():
    slow, app = registries()
    content_type, body = scrape(app)
    assert content_type == text_format.CONTENT_TYPE_LATEST
    assert samples(parse_text(body)) == samples(parse_text(text_format.generate_latest(slow).decode()))


def test_openmetrics_matches_prometheus_client():
    slow, app = registries()
    content_type, body = scrape(app, "application/openmetrics-text; version=1.0.0")
    assert content_type == openmetrics_format.CONTENT_TYPE_LATEST
    assert body.endswith("# EOF\n") and body.count("# EOF") == 1
    want = openmetrics_format.generate_latest(slow).decode()
    assert samples(parse_openmetrics(body)) == samples(parse_openmetrics(want))


def test_a_failing_read_is_counted_and_the_rest_served():
    def broken() -> list[Row]:
        raise OSError("map gone")

    registry = CollectorRegistry()
    collector = TracerCollector(broken, lambda: Health(alloc_entries=3), "1", "k", processes=False)
    registry.register(collector)
    _, body = scrape(MetricsApp(registry, collector, broken))
    assert 'tracer_scrape_errors_total{part="processes"} 1.0' in body
    assert "tracer_alloc_map_entries 3.0" in body


def test_remembered_lines_follow_changed_counters_and_widths():
    from tracer_exporter.views.exposition import ProcessText, _headers
    from tracer_exporter.views.tables import TracerTable, tracer_table

    table, text = TracerTable(), ProcessText(_headers(False))
    fresh = ProcessText(_headers(False))
    first = [*ROWS[:1], Row(9, "x", Counts(kfree_calls=1))]
    later = [*ROWS[:1], Row(9, "x", Counts(kfree_calls=123456))]  # wider kfree column
    for rows in (first, first, later, ROWS, first):
        assert table.render(rows) == tracer_table(rows)
        assert text.render(rows) == ProcessText(_headers(False)).render(rows)
    assert fresh.render(later) == text.render(later)


def raw_scrape(app, environ: dict) -> tuple[dict[str, str], bytes]:
    got = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app({"REQUEST_METHOD": "GET", **environ}, start_response))
    assert got["status"] == "200 OK"
    return got["headers"], body


def test_gzip_when_the_scraper_accepts_it():
    import gzip

    _, app = registries()
    plain_headers, plain = raw_scrape(app, {})
    headers, body = raw_scrape(app, {"HTTP_ACCEPT_ENCODING": "gzip"})
    assert "Content-Encoding" not in plain_headers
    assert (headers["Content-Encoding"], headers["Vary"], headers["Content-Length"]) == (
        "gzip",
        "Accept-Encoding",
        str(len(body)),
    )
    assert samples(parse_text(gzip.decompress(body).decode())) == samples(parse_text(plain.decode()))


def test_accept_encoding_values():
    from tracer_exporter.views.exposition import gzip_accepted

    # Prometheus sends "gzip"; browsers send lists with weights.
    assert [
        gzip_accepted(h)
        for h in ("gzip", "deflate, GZIP;q=0.5", "x-gzip", "gzip;q=0", "gzip;q=0.0", "identity", "", "gzip;q=x")
    ] == [True, True, True, False, False, False, False, False]


def test_members_without_per_process_have_no_series_but_count_as_tracked():
    registry = CollectorRegistry()
    collector = TracerCollector(lambda: ROWS, lambda: Health(), "1", "k", processes=False)
    registry.register(collector)
    rows = [*ROWS, Row(9, "nginx", Counts(up_calls=5), group="web")]
    app = MetricsApp(registry, collector, lambda: rows, lambda rs: [r for r in rs if r.group != "web"])
    _, body = scrape(app)
    assert 'pid="9"' not in body and 'pid="7"' in body
    assert "tracer_tracked_processes 3" in body
