"""The one wiring of the HTTP side, used by the daemon and by `run --listen`."""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from tracer_exporter import __version__
from tracer_exporter.model.groups import GroupRow, Groups
from tracer_exporter.model.health import Health
from tracer_exporter.model.tracking import Tracker
from tracer_exporter.views.collector import TracerCollector
from tracer_exporter.views.exposition import MetricsApp
from tracer_exporter.views.info import InfoCollector
from tracer_exporter.web.access import ControlPolicy
from tracer_exporter.web.auth import WebConfig
from tracer_exporter.web.routes import DEFAULT_TELEMETRY_PATH, App
from tracer_exporter.web.server import DEFAULT_MAX_REQUESTS, HTTPServer


class Web(NamedTuple):
    server: HTTPServer
    registry: CollectorRegistry  # every family but the per-process ones (see MetricsApp)


def build(
    tracker: Tracker,
    health: Callable[[], Health | None],
    not_ready: Callable[[], list[str]],
    listen: str,
    web_config: WebConfig | None = None,
    *,
    policy: ControlPolicy | None = None,
    control: bool = True,
    metrics_path: str = DEFAULT_TELEMETRY_PATH,
    allowed_hosts: Sequence[str] = (),
    max_requests: int = DEFAULT_MAX_REQUESTS,
    groups: Groups | None = None,
) -> Web:
    """The server, not started: /metrics (the process families on the fast path), /tracer,
    /pids and, with control, the control routes that policy allows.

    Raises OSError or ValueError for an address it cannot listen on, WebConfigError for
    certificates it cannot load.
    """
    registry = CollectorRegistry(auto_describe=True)
    group_rows = None
    if groups is not None:
        g = groups

        def group_rows() -> list[GroupRow]:
            return g.rows(tracker.rows)

    collector = TracerCollector(
        tracker.rows, health, __version__, platform.release(), processes=False, groups=group_rows
    )
    registry.register(collector)
    registry.register(InfoCollector())
    # process_* (RSS, CPU, fds, threads) and python_* of the exporter itself.
    for own in (ProcessCollector, PlatformCollector, GCCollector):
        own(registry=registry)
    app = App(
        tracker,
        registry,
        not_ready,
        policy,
        metrics_app=MetricsApp(registry, collector, tracker.rows, groups.metric_rows if groups else None),
        metrics_path=metrics_path,
        control=control,
        allowed_hosts=allowed_hosts,
    )
    return Web(HTTPServer(listen, app, web_config, max_requests), registry)
